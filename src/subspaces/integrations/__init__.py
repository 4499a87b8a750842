"""Formats and engines other tools speak: PEFT adapters, the Hugging Face Trainer."""
