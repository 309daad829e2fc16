"""Kahneman-Tversky optimisation (KTO) of a LoRA/QLoRA adapter with TRL's KTOTrainer: unpaired good/bad examples.

    finetune train recipes/smollm2-135m/kto_lora.yaml [key=value ...]

Data: `format: unpaired_preference` rows (prompt, completion, label true = desirable / false = undesirable).
`model.init_from` works as in DPO: the policy continues that run's adapter and the reference is that run's
model, frozen. Held-out figures: TRL's eval metrics and the mean log-probability of the desirable and the
undesirable held-out completions under the policy, and their gap.
"""

from __future__ import annotations

from finetune import data as data_lib
from finetune import fastpath
from finetune.logprobs import completion_logps
from finetune.stages import runner

CONFIG = "KTOConfig"
TASK = "causal_lm"
OWNS = {}
DEFAULTS = {"learning_rate": 5e-5}


def config_kwargs(recipe) -> dict:
    return {"max_length": recipe.data.max_length}


def prepare(recipe, tokenizer, chat, seed):
    return data_lib.prepare_rows(recipe.data, "unpaired", "kto", seed)


def build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe):
    from trl import KTOTrainer

    # TRL's fused head at labelled positions only, on the CPU too (finetune/fastpath.py)
    trainer_class = fastpath.compact_head_trainer(KTOTrainer) if recipe.train.fast_path else KTOTrainer
    return trainer_class(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def held_out(trainer, prepared) -> dict | None:
    if prepared.eval is None:
        return None
    rows = list(prepared.eval)
    model = trainer.accelerator.unwrap_model(trainer.model)
    logps = completion_logps(model, trainer.processing_class, [r["prompt"] for r in rows],
                             [r["completion"] for r in rows])
    good = [lp for lp, r in zip(logps, rows) if r["label"]]
    bad = [lp for lp, r in zip(logps, rows) if not r["label"]]
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    gap = mean(good) - mean(bad) if good and bad else None
    return {**runner.eval_loss(trainer, prepared), "desirable_logp": mean(good), "undesirable_logp": mean(bad),
            "logp_gap": round(gap, 4) if gap is not None else None}


def summary(before, after, history) -> dict:
    return {
        "eval_loss_before": before and before.get("eval_loss"),
        "eval_loss_after": after and after.get("eval_loss"),
        "heldout_logp_gap_before": before and before["logp_gap"],
        "heldout_logp_gap_after": after and after["logp_gap"],
    }


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)
