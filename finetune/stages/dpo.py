"""Direct preference optimisation (DPO and its loss family) of a LoRA/QLoRA adapter with TRL's DPOTrainer.

    finetune train recipes/smollm2-135m/dpo_lora.yaml [key=value ...]

Data: `format: preference` rows (prompt, chosen, rejected; text or message lists). `train.loss_type` is a
list of TRL's DPO losses (sigmoid, hinge, ipo, ...) combined with `train.loss_weights`; `train.beta` is the
KL weight. The reference model: with `model.init_from: RUN_DIR` the policy continues that run's adapter and
the reference is that run's model (base + its adapter), frozen (TRL copies the adapter into a "ref"
adapter); without it, the reference is the base with the adapter disabled. Either way no second copy of the
base is loaded. Held-out figures: the share of held-out pairs where the policy gives log p(chosen) > log
p(rejected), overall and per rejection type, before and after; and after, the held-out DPO loss, reward margin and
accuracy against the reference. For the plain sigmoid loss these come from the same log-probabilities: the policy
before its first step is its reference (its margins are the reference's), so the loss is
mean(-log sigmoid(beta x (margin after - margin before))) with no second pass over the pairs (TRL's evaluation
makes two, policy and reference: ~60 s on the demo's 80 pairs here). Other losses, and held-out pairs that
TRL truncates (longer than `data.max_length`): TRL's evaluation.
"""

from __future__ import annotations

import math

from finetune import data as data_lib
from finetune import fastpath
from finetune.logprobs import pair_summary, preference_margins
from finetune.stages import runner

CONFIG = "DPOConfig"
TASK = "causal_lm"
OWNS = {}
# A preference step moves a policy further per step than SFT; LoRA DPO is usually run at 1e-5..1e-4.
DEFAULTS = {"learning_rate": 5e-5}


def config_kwargs(recipe) -> dict:
    return {"max_length": recipe.data.max_length}


def prepare(recipe, tokenizer, chat, seed):
    return data_lib.prepare_rows(recipe.data, "preference", "dpo", seed)


def build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe):
    from trl import DPOTrainer

    # TRL's fused head at labelled positions only, on the CPU too (finetune/fastpath.py)
    trainer_class = fastpath.compact_head_trainer(DPOTrainer) if recipe.train.fast_path else DPOTrainer
    return trainer_class(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def held_out(trainer, prepared) -> dict | None:
    if prepared.eval is None:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    rows = list(prepared.eval)
    margins = preference_margins(model, trainer.processing_class, rows)
    figures = {"preference": pair_summary(margins, rows)}
    # Before the first step the policy is its reference: the eval loss is ln 2 and the margins 0 by construction.
    if trainer.state.global_step == 0:
        trainer.heldout_reference_margins = margins
        return figures
    reference = getattr(trainer, "heldout_reference_margins", None)
    if reference is not None and _plain_sigmoid(trainer.args) and _untruncated(trainer, len(rows)):
        rewards = [trainer.args.beta * (m - r) for m, r in zip(margins, reference)]
        figures.update({"eval_loss": round(sum(_softplus(-x) for x in rewards) / len(rewards), 6),
                        "eval_rewards/margins": round(sum(rewards) / len(rewards), 6),
                        "eval_rewards/accuracies": round(sum(x > 0 for x in rewards) / len(rewards), 4)})
    else:
        figures.update(runner.eval_loss(trainer, prepared))
    return figures


def _plain_sigmoid(args) -> bool:
    """TRL's loss is -log sigmoid(beta x (policy margin - reference margin)) with a frozen reference."""
    loss = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    return (loss == ["sigmoid"] and not args.label_smoothing and list(args.loss_weights or [1.0]) == [1.0]
            and args.ld_alpha is None and not args.use_weighting and not args.sync_ref_model
            and str(args.f_divergence_type).endswith("reverse_kl"))


def _untruncated(trainer, pairs: int) -> bool:
    """Whether TRL's evaluation scores every held-out pair whole: none dropped (a prompt that fills max_length) and
    none cut to max_length. The log-probabilities above are of whole answers; where TRL truncates, its loss is of
    the truncated ones, so it is computed by TRL's evaluation instead."""
    data, limit = trainer.eval_dataset, trainer.args.max_length
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    if not all(c in getattr(data, "column_names", ()) for c in columns) or len(data) != pairs:
        return False
    return limit is None or all(len(p) + max(len(c), len(r)) <= limit
                                for p, c, r in zip(*(data[c] for c in columns)))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def summary(before, after, history) -> dict:
    last = history[-1] if history else {}
    return {
        "train_reward_margin_last": last.get("rewards/margins"),
        "train_reward_accuracy_last": last.get("rewards/accuracies"),
        "eval_loss_after": after and after.get("eval_loss"),
        "eval_reward_margin_after": after and after.get("eval_rewards/margins"),
        "heldout_preference_before": before and before["preference"],
        "heldout_preference_after": after and after["preference"],
    }


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)
