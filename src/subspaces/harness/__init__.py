"""The comparison harness: fine-tune methods on the same model, task and budget; a leaderboard
(``harness.compare.compare``)."""
from .finetune import finetune
from .sft import finetune_lm

__all__ = ["finetune", "finetune_lm"]
