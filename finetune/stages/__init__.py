"""Training stages: one file each, over the shared run lifecycle in finetune/stages/runner.py.

A stage module holds only what is its own:

    CONFIG          name of its TRL config class, or a dotted transformers name (`train` keys are checked against
                    its fields)
    TASK            "causal_lm" or "seq_cls": the model class that loads, trains, exports and generates
    OWNS            TRL config keys that the recipe sets elsewhere for this stage (key -> where)
    DEFAULTS        (optional) our defaults for its TRL config, over recipe.TRAIN_DEFAULTS
    config_kwargs(recipe) -> dict              TRL config values taken from other recipe sections
    prepare(recipe, tokenizer, chat, seed) -> data.Prepared   its data, checked (and cached where it pays)
    build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe) -> trainer
    held_out(trainer, prepared) -> dict        held-out figures, run before and after training
    summary(before, after, history) -> dict    the stage's own figures for run.json
    throughput(trainer, tokens_per_second, prepared) -> dict   (optional) figures that need the trained model and
                                               the measured tokens/s (model size, MFU)
    main(recipe)                               train: the runner's lifecycle around this stage

A new stage is one file plus one line in STAGES.
"""

from __future__ import annotations

import importlib

# stage name -> module
STAGES = {
    "pretrain": "finetune.stages.pretrain",
    "sft": "finetune.stages.sft",
    "reward": "finetune.stages.reward",
    "dpo": "finetune.stages.dpo",
    "kto": "finetune.stages.kto",
    "grpo": "finetune.stages.grpo",
    "rloo": "finetune.stages.rloo",
}


def get(name: str):
    """The module of a stage (its name is checked by the recipe schema)."""
    return importlib.import_module(STAGES[name])


def config_class(name: str):
    """The TRL (or transformers) config class whose fields a stage's `train` keys are."""
    import trl

    module, _, cls = get(name).CONFIG.rpartition(".")
    return getattr(importlib.import_module(module) if module else trl, cls)
