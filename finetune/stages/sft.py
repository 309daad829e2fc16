"""Supervised fine-tuning (SFT) of a LoRA/QLoRA adapter with TRL's SFTTrainer.

    finetune train recipes/smollm2-135m/sft_qlora.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml -m finetune train RECIPE [key=value ...]

Trains on assistant tokens only (each turn's end-of-turn token included): the labels are built in
finetune/data.py from the training chat template, so TRL gets tokenized rows (packed when data.packing).
Held-out figure: the loss on the held-out conversations, before and after.
"""

from __future__ import annotations

from finetune import data as data_lib
from finetune import fastpath, models
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

    class Trainer(SFTTrainer):
        """TRL's SFTTrainer whose loss is taken only where labels are (finetune/fastpath.py): logits at trained
        positions, attention within each packed document, LoRA in the base's dtype. Anything the fast loss does not
        cover (label smoothing, DFT, a custom loss, MoE router loss, soft-capped logits) is TRL's own path."""

        def fast(self) -> bool:
            """Whether the step is the fast one: not for what it does not cover (TRL's own step then)."""
            return (recipe.train.fast_path and fastpath.usable(self.model) and self.label_smoother is None
                    and self.compute_loss_func is None and self.args.loss_type == "nll" and not self.aux_loss_enabled)

        def training_step(self, *args, **kwargs):
            if not self.fast():
                return super().training_step(*args, **kwargs)
            with fastpath.step_modules(self.model, compute_dtype):  # backward's recomputation sees the same forward
                return super().training_step(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # Evaluation asks for the outputs too, but keeps only the loss when there is no compute_metrics: the
            # held-out loss is then the fast one as well (TRL's computes every position's logits, its entropy
            # and accuracy: the run's peak memory once, with eval batches of 8 rows).
            loss_only = return_outputs and not model.training and self.compute_metrics is None
            if (return_outputs and not loss_only) or not self.fast():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with fastpath.lora_autocast(self.model, compute_dtype, self.args.device.type):
                loss = fastpath.trainer_loss(self, model, inputs, num_items_in_batch)
            # TRL's count of input tokens (its tokens/s and num_tokens); entropy and accuracy are not computed.
            if self.model.training and "attention_mask" not in inputs and self.accelerator.num_processes == 1:
                # TRL's count, known on the host: no device round trip (a sync between forward and backward on GPUs)
                self._total_train_tokens += inputs["position_ids"].size(1) // self._tp_size
            elif self.model.training:
                if "attention_mask" in inputs:
                    seen = inputs["attention_mask"].sum()
                else:
                    seen = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
                self._total_train_tokens += self.accelerator.gather_for_metrics(seen).sum().item() // self._tp_size
            self._metrics["train" if self.model.training else "eval"]["num_tokens"] = [self._total_train_tokens]
            return (loss, {}) if loss_only else loss

    import torch

    compute_dtype = models.resolve_dtype(recipe.model.dtype)
    if recipe.train.fast_path:
        fastpath.install_attention()
    fastpath.install_fused(recipe.train.fused_kernels if recipe.train.fast_path else False, args)
    # TRL packs the rows with datasets' map, which writes its result beside the data it maps: into the processed-data
    # cache that other processes read. Kept out of it (in a temporary folder of this process), the cache stays as
    # it was published.
    with data_lib.maps_outside_cache():
        return Trainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                       processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


held_out = runner.eval_loss


def summary(before, after, history) -> dict:
    return {"eval_loss_before": before["eval_loss"] if before else None,
            "eval_loss_after": after["eval_loss"] if after else None}


def main(recipe, callbacks=()):
    return runner.train(recipe, callbacks)

