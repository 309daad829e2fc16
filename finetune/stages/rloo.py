"""REINFORCE leave-one-out (RLOO) of a LoRA/QLoRA adapter with TRL's RLOOTrainer: online RL like GRPO.

    finetune train recipes/smollm2-135m/rloo_lora.yaml [key=value ...]

The same data, rewards, generation settings and held-out figures as finetune/stages/grpo.py; each answer's
baseline is the mean reward of the other answers to its prompt. `train.beta` (TRL's RLOO default 0.05)
weighs the KL penalty to the reference model. Sampled answers and their rewards go to completions.jsonl.
"""

from __future__ import annotations

from finetune import fastpath
from finetune.stages import runner
from finetune.stages.grpo import (  # noqa: F401 - the same as GRPO's
    DEFAULTS,
    OWNS,
    completion_log,
    config_kwargs,
    held_out,
    prepare,
    reward_inputs,
    summary,
)

CONFIG = "RLOOConfig"
TASK = "causal_lm"


def build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe):
    from trl import RLOOTrainer

    # TRL's fused head at labelled positions only, on the CPU too (finetune/fastpath.py)
    trainer_class = fastpath.compact_head_trainer(RLOOTrainer) if recipe.train.fast_path else RLOOTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                            **reward_inputs(recipe))
    trainer.add_callback(completion_log(trainer, recipe.output_dir))
    return trainer


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)
