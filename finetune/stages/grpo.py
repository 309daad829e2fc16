"""Group relative policy optimisation (GRPO) of a LoRA/QLoRA adapter with TRL's GRPOTrainer: online RL.

    finetune train recipes/smollm2-135m/grpo_lora.yaml [key=value ...]

For each prompt the policy samples `train.num_generations` answers (`train.max_completion_length`,
`train.temperature`, `train.top_p`, ... set generation); each is scored by the recipe's `rewards` (rule
functions and/or a trained reward model: RLHF proper; see finetune/rewards.py), weighted and summed; the
policy moves toward answers that beat their group's mean. `train.beta` weighs the KL penalty to the
reference model (TRL's GRPO default is 0: no reference at all); with `model.init_from` the reference is
that run's model, else the base. Data: any chat format; the prompt is everything before the last assistant
turn, which is the reference answer for rule rewards. Held-out figure: TRL's eval reward on the held-out
prompts. Every sampled answer and its rewards go to RUN_DIR/completions.jsonl, to read what was rewarded.
On CPU with QLoRA, sampling is a no-grad forward of the 4-bit layers: finetune.models guards the
bitsandbytes repacking that would otherwise silently stop LoRA gradients after it.
"""

from __future__ import annotations

from finetune import data as data_lib
from finetune import fastpath
from finetune import rewards as rewards_lib
from finetune.errors import FinetuneError
from finetune.stages import runner

CONFIG = "GRPOConfig"
TASK = "causal_lm"
OWNS = {}
DEFAULTS = {"learning_rate": 1e-5}


def config_kwargs(recipe) -> dict:
    return {"reward_weights": [source.weight for source in recipe.rewards]}


def prepare(recipe, tokenizer, chat, seed):
    prepared = data_lib.prepare_rows(recipe.data, "prompt", recipe.train.stage, seed)
    if any(source.function == "format" for source in recipe.rewards):
        unpatterned = sorted({d["dataset"] for d in prepared.stats["datasets"]
                              if not data_lib.load_spec(d["dataset"]).adherence_regex})
        if unpatterned:
            raise FinetuneError(f"{recipe.source}: the format reward needs an adherence_regex in the dataset YAML of "
                                f"{', '.join(unpatterned)}; add one or drop the format reward")
    return prepared


def reward_inputs(recipe) -> dict:
    funcs, processing = rewards_lib.build(recipe.rewards)
    return {"reward_funcs": funcs, "reward_processing_classes": processing}


def build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe):
    from trl import GRPOTrainer

    # TRL's fused head at labelled positions only, on the CPU too (finetune/fastpath.py)
    trainer_class = fastpath.compact_head_trainer(GRPOTrainer) if recipe.train.fast_path else GRPOTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks,
                            **reward_inputs(recipe))
    trainer.add_callback(completion_log(trainer, recipe.output_dir))
    return trainer


def completion_log(trainer, run_dir):
    """A callback that appends the latest batch of sampled training answers, with each reward's value, to
    completions.jsonl at each logged step (logging_steps == steps_per_generation logs every batch). TRL keeps
    them in the trainer's `_logs` for its console/W&B tables and has no hook that hands them out."""
    import json
    from pathlib import Path

    from transformers import TrainerCallback

    from finetune.rundir import redact

    class CompletionLog(TrainerCallback):
        last = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and any(key.startswith("eval_") for key in logs):
                return  # evaluate() fills the same buffers with held-out answers
            logs = trainer._logs
            batch = list(logs["completion"])
            if not state.is_world_process_zero or not batch or batch == self.last:
                return
            self.last = batch
            names = list(logs["rewards"])
            rewards = {name: list(logs["rewards"][name]) for name in names}
            with open(Path(run_dir) / "completions.jsonl", "a") as f:
                for i, (prompt, completion) in enumerate(zip(list(logs["prompt"]), batch)):
                    row = {"step": state.global_step, "prompt": prompt, "completion": completion,
                           "rewards": {name: rewards[name][i] for name in names}}
                    f.write(json.dumps(redact(row)) + "\n")

    return CompletionLog()


held_out = runner.eval_loss


def summary(before, after, history) -> dict:
    rewards = [row["reward"] for row in history if "reward" in row]
    k = max(1, min(5, len(rewards) // 4))  # mean of the first and last few logged steps: one step is noisy
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "train_reward_first": mean(rewards[:k]),
        "train_reward_last": mean(rewards[-k:]),
        "eval_reward_before": before and before.get("eval_reward"),
        "eval_reward_after": after and after.get("eval_reward"),
    }


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)
