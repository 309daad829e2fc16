"""finetune: turn a Base model into a Chat model with LoRA/QLoRA recipes over TRL."""

__version__ = "0.1.0"
