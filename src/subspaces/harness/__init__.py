"""The comparison harness: fine-tune methods on the same model, task and budget; a leaderboard."""
from .finetune import finetune

__all__ = ["finetune"]
