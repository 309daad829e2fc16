"""Direct preference optimisation (DPO and its loss family) of a LoRA/QLoRA adapter with TRL's DPOTrainer.

    finetune train recipes/smollm2-135m/dpo_lora.yaml [key=value ...]

Data: `format: preference` rows (prompt, chosen, rejected; text or message lists). `train.loss_type` is a
list of TRL's DPO losses (sigmoid, hinge, ipo, ...) combined with `train.loss_weights`; `train.beta` is the
KL weight. The reference model: with `model.init_from: RUN_DIR` the policy continues that run's adapter and
the reference is that run's model (base + its adapter), frozen (TRL copies the adapter into a "ref"
adapter); without it, the reference is the base with the adapter disabled. Either way no second copy of the
base is loaded. Held-out figures: TRL's eval loss, reward margins and accuracies, and the share of held-out
pairs where the policy gives log p(chosen) > log p(rejected), overall and per rejection type.
"""

from __future__ import annotations

from finetune import data as data_lib
from finetune.logprobs import preference_figures
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

    return DPOTrainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                      processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def held_out(trainer, prepared) -> dict | None:
    if prepared.eval is None:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    figures = {"preference": preference_figures(model, trainer.processing_class, prepared.eval)}
    # Before the first step the policy is its reference: TRL's eval loss is ln 2 and its margins 0 by construction.
    if trainer.state.global_step > 0:
        figures.update(runner.eval_loss(trainer, prepared))
    return figures


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
