"""Reward modelling: a sequence classifier with one output, trained on preference pairs with TRL's RewardTrainer.

    finetune train recipes/smollm2-135m/reward_lora.yaml [key=value ...]

Data: `format: preference` rows. The base loads as AutoModelForSequenceClassification (num_labels 1) with a
LoRA/QLoRA adapter of task type SEQ_CLS, so peft trains the score head in full and saves it beside the
adapter (otherwise the head would stay random). Held-out figure: pairwise accuracy, the share of held-out
pairs that the model scores chosen above rejected, overall and per rejection type, from scores computed
here (finetune.rewards.score, the same function that scores GRPO/RLOO completions and compare's answers).
A reward run is a reward source for grpo/rloo (`rewards: [{model: RUN_DIR}]`) and `compare --reward-model`.
"""

from __future__ import annotations

from finetune import data as data_lib
from finetune import rewards as rewards_lib
from finetune.logprobs import pair_summary
from finetune.stages import runner

CONFIG = "RewardConfig"
TASK = "seq_cls"
OWNS = {}


def config_kwargs(recipe) -> dict:
    return {"max_length": recipe.data.max_length}


def prepare(recipe, tokenizer, chat, seed):
    return data_lib.prepare_rows(recipe.data, "preference", "reward", seed)


def build_trainer(model, args, prepared, tokenizer, peft_config, callbacks, recipe):
    from trl import RewardTrainer

    return RewardTrainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def pairwise(model, tokenizer, pairs) -> dict:
    """Share of pairs scored chosen > rejected and the mean score margin, overall and per kind, and the chosen
    answers' scores (to check a reloaded run against)."""
    rows = list(pairs)
    chosen = rewards_lib.score(model, tokenizer, [[*r["prompt"], *r["chosen"]] for r in rows])
    rejected = rewards_lib.score(model, tokenizer, [[*r["prompt"], *r["rejected"]] for r in rows])
    return {**pair_summary([c - r for c, r in zip(chosen, rejected)], rows),
            "scores_chosen": [round(s, 6) for s in chosen]}


def held_out(trainer, prepared) -> dict | None:
    if prepared.eval is None:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    was_training = model.training
    model.eval()
    try:
        figures = pairwise(model, trainer.processing_class, prepared.eval)
    finally:
        model.train(was_training)
    return {**runner.eval_loss(trainer, prepared), "pairwise": figures}


def summary(before, after, history) -> dict:
    last = history[-1] if history else {}
    strip = lambda f: f and {k: v for k, v in f["pairwise"].items() if k != "scores_chosen"}  # noqa: E731
    return {
        "train_accuracy_last": last.get("accuracy"),
        "eval_loss_before": before and before.get("eval_loss"),
        "eval_loss_after": after and after.get("eval_loss"),
        "heldout_pairwise_before": strip(before),
        "heldout_pairwise_after": strip(after),
        "heldout_scores_chosen": after and after["pairwise"]["scores_chosen"],
    }


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)
