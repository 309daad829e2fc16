"""Supervised fine-tuning (SFT) of a LoRA/QLoRA adapter with TRL's SFTTrainer.

    finetune train recipes/smollm2-135m/sft_qlora.yaml [key=value ...]
    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml -m finetune train RECIPE [key=value ...]

Reads the recipe's model, data and adapter, trains on assistant tokens only (each turn's end-of-turn
token included), and writes the run directory described in finetune/rundir.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from finetune import data as data_lib
from finetune import models, templates as templates_lib
from finetune.errors import FinetuneError
from finetune.recipe import Recipe
from finetune.rundir import (
    RunCallback, RunRecord, check_output_dir, clear_output_dir, git_commit, package_versions, plot_losses,
)


def sft_config(recipe: Recipe):
    """The TRL config: the recipe's `train` keys over our defaults, plus the keys the recipe owns elsewhere."""
    from trl import SFTConfig

    dtype = models.resolve_dtype(recipe.model.dtype)
    args = dict(recipe.train.args)
    args.setdefault("bf16", dtype == torch.bfloat16)
    args.setdefault("fp16", dtype == torch.float16 and torch.cuda.is_available())
    args.setdefault("use_cpu", not torch.cuda.is_available())
    return SFTConfig(
        output_dir=str(Path(recipe.output_dir) / "checkpoints"),
        seed=recipe.seed,
        max_length=recipe.data.max_length,
        packing=recipe.data.packing,
        # Labels are built in finetune/data.py (assistant tokens + end-of-turn), so TRL gets tokenized rows.
        assistant_only_loss=False,
        **args,
    )


def build(recipe: Recipe, callbacks=()):
    """Everything up to a ready trainer. Shared by `train` and `validate`."""
    from accelerate import PartialState
    from trl import SFTTrainer

    # --- Trainer arguments first: under accelerate, the process rank is known only once they exist.
    try:
        args = sft_config(recipe)
    except ValueError as e:  # TRL/transformers' own range and combination checks
        raise FinetuneError(f"{recipe.source}: train: {e}") from None
    state = PartialState()
    run_dir = Path(recipe.output_dir)

    # --- Model folder and tokenizer. The main process converts the embedded model; the others wait.
    with state.main_process_first():
        model_path = models.resolve_model(recipe.model.name)
    tokenizer = models.load_tokenizer(model_path, recipe.model.trust_remote_code)
    try:
        chat = templates_lib.resolve(tokenizer, recipe.data.chat_template, recipe.data.assistant_only_loss)
    except FinetuneError as e:
        raise FinetuneError(f"{recipe.source}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are padded with -100, so EOS stays trained

    # --- Data: checked, tokenized with loss masks, cached (built once, by the main process).
    with state.main_process_first():
        prepared = data_lib.prepare(recipe.data, tokenizer, chat, seed=recipe.seed)

    # --- Model and adapter.
    model = models.load_model(recipe.model, recipe.quantization, model_path)
    new_token_ids = None
    if chat.added_tokens:
        if getattr(model.config, "tie_word_embeddings", False) and recipe.adapter.type == "lora":
            # peft wraps a tied head in a trainable-tokens layer that TRL's fused loss cannot read (no .bias).
            raise FinetuneError(
                f"{recipe.source}: the model ties its head to its embeddings and its vocabulary lacks the chat "
                f"tokens {chat.added_tokens}; training new token rows on a tied head is not supported with LoRA. "
                "Pick a data.chat_template whose tokens the vocabulary has, or use adapter.type: none"
            )
        model.resize_token_embeddings(len(tokenizer))
        new_token_ids = tokenizer.convert_tokens_to_ids(chat.added_tokens)
    peft_config = models.lora_config(recipe.adapter, new_token_ids)
    run_callback = RunCallback(run_dir, state.is_main_process)
    try:
        trainer = _trainer(SFTTrainer, model, args, prepared, tokenizer, peft_config, [run_callback, *callbacks])
    except ValueError as e:
        if "target modules" in str(e).lower() or "not found in the base model" in str(e):
            raise FinetuneError(
                f"{recipe.source}: adapter.target_modules = {recipe.adapter.target_modules}: {e}. Use module "
                "names of this model (e.g. q_proj, v_proj) or all-linear"
            ) from None
        raise
    # TRL casts adapters of quantized models to bf16; keep them (and so the optimizer state) as the recipe says.
    adapter_dtype = torch.float32 if recipe.adapter.dtype == "fp32" else torch.bfloat16
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != adapter_dtype:
            param.data = param.data.to(adapter_dtype)
    return trainer, prepared, chat, run_callback, state


def main(recipe: Recipe, callbacks=()) -> Path:
    run_dir = Path(recipe.output_dir)
    # Early, before slow loading; by the first process only (RANK is set by accelerate/torchrun before the trainer
    # exists), since the others may start after rank 0's trainer has made output_dir/checkpoints.
    if int(os.environ.get("RANK", "0")) == 0:
        check_output_dir(run_dir, recipe.train.resume, recipe.overwrite, recipe.source)
    trainer, prepared, chat, run_callback, state = build(recipe, callbacks)

    # --- The run directory (checked above): replaced (overwrite=true) only now that the recipe, model and data
    # have all loaded, so a failing recipe never costs the previous run.
    if state.is_main_process:
        if recipe.overwrite:
            clear_output_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    record = RunRecord(run_dir, state.is_main_process, {
        "stage": "sft",
        "recipe": recipe.to_dict(),
        "recipe_file": recipe.source,
        "base_model": {"name": recipe.model.name, "path": models.resolve_model(recipe.model.name),
                       "hub_id": models.hub_id_of(recipe.model.name)},
        "chat_template": {"family": chat.family, "added_tokens": chat.added_tokens,
                          "end_of_turn": _end_of_turn(trainer.processing_class, chat)},
        "data": prepared.stats,
        "dataset_hashes": prepared.hashes,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "world_size": state.num_processes,
        "device": str(trainer.args.device),
    })
    record.update()
    _print_data_summary(prepared.stats, state.is_main_process)
    try:
        summary, processes = _train_and_save(trainer, prepared, chat, run_callback, recipe, run_dir, state)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt) or run_callback.interrupted
        record.update(status="interrupted" if interrupted else "failed", error=f"{type(e).__name__}: {e}",
                      step=trainer.state.global_step, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        raise
    finally:
        run_callback.restore_signal_handlers()
    record.update(status="completed", summary=summary, processes=processes, adapter="adapter",
                  adapter_sha256=_adapter_hash(run_dir / "adapter") if state.is_main_process else None,
                  ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if state.is_main_process:
        print(json.dumps(summary, indent=2))
        print(f"Run directory: {run_dir}\nLoss curve:    {run_dir / 'loss_curve.png'}")
    return run_dir


def _train_and_save(trainer, prepared, chat, run_callback, recipe, run_dir, state):
    # --- Held-out loss before training, so the run shows what it changed.
    eval_before = trainer.evaluate(metric_key_prefix="eval") if prepared.eval is not None else None

    # --- Train. SIGINT/SIGTERM save a checkpoint and stop at the end of the current step.
    run_callback.install_signal_handlers()
    start = time.time()
    result = trainer.train(resume_from_checkpoint=True if recipe.train.resume else None)
    seconds = time.time() - start
    processes = _per_process_counts(trainer, run_callback)
    if run_callback.interrupted:
        raise FinetuneError(
            f"training interrupted by {run_callback.interrupted} at step {trainer.state.global_step}; a checkpoint "
            f"is in {run_dir}/checkpoints. Continue with: finetune train {recipe.source} train.resume=true "
            f"output_dir={run_dir}"
        )

    # --- Held-out loss after, and the adapter with the model's own inference template.
    eval_after = trainer.evaluate(metric_key_prefix="eval") if prepared.eval is not None else None
    if state.is_main_process and eval_after:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")  # now with the final held-out loss
    adapter_dir = run_dir / "adapter"
    trainer.processing_class.chat_template = chat.inference
    trainer.save_model(str(adapter_dir))
    if state.is_main_process:
        # The Trainer pickles its arguments and peft writes a blank model card; run.json holds both instead,
        # and the adapter folder stays safetensors + JSON only.
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)
        (adapter_dir / "README.md").unlink(missing_ok=True)

    history = [row for row in trainer.state.log_history if "loss" in row]
    rate = run_callback.tokens_per_second()
    summary = {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(seconds, 1),
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "train_loss_mean": result.training_loss,
        "eval_loss_before": eval_before["eval_loss"] if eval_before else None,
        "eval_loss_after": eval_after["eval_loss"] if eval_after else None,
        # Input tokens (TRL's count, all processes) per second, from the first to the last logged step.
        "tokens_per_second": round(rate, 1) if rate else None,
        "peak_memory_mib": _peak_memory_mib(),
    }
    return summary, processes


def _end_of_turn(tokenizer, chat) -> str | None:
    if not templates_lib.has_markers(chat.training):
        return None  # a template without markers (assistant_only_loss: false): export falls back to EOS
    return tokenizer.convert_ids_to_tokens(templates_lib.end_of_turn_token_id(tokenizer, chat.training))


def _trainer(trainer_cls, model, args, prepared, tokenizer, peft_config, callbacks):
    return trainer_cls(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                       processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)


def _steps_per_epoch(trainer) -> int:
    batches = len(trainer.get_train_dataloader())
    return max(1, math.ceil(batches / trainer.args.gradient_accumulation_steps))


def _per_process_counts(trainer, callback) -> list[dict]:
    """Each process's share: its dataloader's batches per epoch, out of all the epoch's batches, and the steps
    it ran (gathered to rank 0)."""
    all_batches = math.ceil(len(trainer.train_dataset) / trainer.args.per_device_train_batch_size)
    mine = {"batches_per_epoch": len(trainer.get_train_dataloader()), "batches_per_epoch_all": all_batches,
            "steps": callback.steps_this_process}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        return [{"rank": i, **row} for i, row in enumerate(everyone)]
    return [{"rank": 0, **mine}]


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def _adapter_hash(adapter_dir: Path) -> str | None:
    path = adapter_dir / "adapter_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _print_data_summary(stats: dict, is_main: bool) -> None:
    if not is_main:
        return
    overlap = stats.get("overlap") or {}
    print(
        f"Data: {stats['train_rows']} training rows ({stats['train_tokens']} tokens, {stats['trained_tokens']} "
        f"trained), {stats['eval_rows']} held-out rows; {stats['truncated']} truncated, {stats['dropped']} dropped; "
        f"held-out overlap: {overlap.get('exact', 0)} exact, {overlap.get('near', 0)} near-duplicate",
        flush=True,
    )
