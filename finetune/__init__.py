"""finetune: turn a Base model into a Chat model with LoRA/QLoRA recipes over TRL.

Python API (finetune/api.py): finetune.train(recipe, **overrides), finetune.export(run_dir, ...),
finetune.compare(models, prompts, ...); each returns paths and figures.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so `import finetune` stays light.
    import importlib

    if name == "train":
        from finetune.api import train

        return train
    if name in ("export", "compare"):
        return importlib.import_module(f"finetune.{name}")  # callable modules (finetune/api.py)
    raise AttributeError(f"module 'finetune' has no attribute {name!r}")
