"""Supervised fine-tuning (SFT) of a LoRA/QLoRA adapter with TRL's SFTTrainer.

    finetune train recipes/smollm2-135m/sft_qlora.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml -m finetune train RECIPE [key=value ...]

Trains on assistant tokens only (each turn's end-of-turn token included): the labels are built in
finetune/data.py from the training chat template, so TRL gets tokenized rows (packed when data.packing).
Held-out figure: the loss on the held-out conversations, before and after.
"""

from __future__ import annotations

from finetune import data as data_lib
from finetune.stages import runner

CONFIG = "SFTConfig"
TASK = "causal_lm"
OWNS = {}


def config_kwargs(recipe) -> dict:
    return {
        "max_length": recipe.data.max_length,
        "packing": recipe.data.packing,
        # Labels are built in finetune/data.py (assistant tokens + end-of-turn), so TRL gets tokenized rows.
        "assistant_only_loss": False,
    }


def prepare(recipe, tokenizer, chat, seed):
    """Conversations checked, tokenized with loss masks and cached (finetune/data.py)."""
    return data_lib.prepare(recipe.data, tokenizer, chat, seed=seed)


def build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe):
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


held_out = runner.eval_loss


def summary(before, after, history) -> dict:
    return {"eval_loss_before": before["eval_loss"] if before else None,
            "eval_loss_after": after["eval_loss"] if after else None}


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)

