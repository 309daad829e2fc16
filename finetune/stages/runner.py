"""The run lifecycle every stage shares: what a training run does around its stage's trainer.

    finetune train RECIPE [key=value ...]       (calls train(recipe) for the recipe's train.stage)

1. Check output_dir (first process only, before slow loading).
2. Build: the stage's TRL config, the base model folder and tokenizer, the chat template, the stage's data,
   the model (the stage's model class, 4/8-bit as the recipe says) with a fresh adapter, or with the adapter
   of `model.init_from` to continue, then the stage's trainer. `model.name: scratch` builds a random model and
   trains its tokenizer instead (finetune/scratch.py; stage pretrain).
3. A resume (train.resume): the checkpoint it names, refused if the recipe, data hashes or library versions
   differ from run.json's (unless train.resume_changes) or if its pickles would run code (finetune/trust.py);
   later checkpoints set aside, metrics logged after it dropped (finetune/checkpoints.py); on CUDA, the batch the
   checkpoint was trained with, not a new fit to free memory (finetune/memory.py).
4. Replace output_dir (overwrite=true) only now that everything loaded; write run.json (status running, and the
   process that writes it, so that a killed run reads as interrupted).
5. Held-out figures before, train (SIGINT/SIGTERM: checkpoint and stop), held-out figures after. Checkpoints are
   staged and published whole (finetune/checkpoints.py); a NaN/inf loss or gradient stops the run before its
   update, or skips it (finetune/nonfinite.py).
6. Save the adapter (safetensors + tokenizer with the inference template; no pickles) in RUN_DIR/adapter, or the
   whole model (adapter.type none) as an HF model folder in RUN_DIR/model (under FSDP2 gathered from the processes'
   shards: finetune/distributed.py), written aside and published by one rename; a run whose folder holds no weights
   fails. The summary, and run.json with status completed (or failed/interrupted, with the error, on any
   exception).

The run directory's layout is described in finetune/rundir.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import checkpoints, console, distributed, fastpath, memory, models, scratch, stages, trackers, trust
from finetune import templates as templates_lib
from finetune.errors import FinetuneError
from finetune.files import process_start_ticks, staged_dir
from finetune.nonfinite import NonFiniteGuard
from finetune.recipe import SCRATCH, Recipe
from finetune.rundir import (
    RunCallback,
    RunRecord,
    check_output_dir,
    clear_output_dir,
    git_commit,
    package_versions,
    plot_losses,
    read_completed_run,
    read_run,
    redact,
)


@dataclass
class Built:
    """Everything up to a ready trainer; shared by `train` and `validate`."""

    trainer: object
    prepared: object
    chat: object
    callback: RunCallback
    state: object
    stage: object  # the stage's module
    init_run: dict | None  # run.json of model.init_from
    guard: NonFiniteGuard | None = None
    resume_from: Path | None = None  # the checkpoint a resumed run continues
    estimate: dict | None = None  # peak memory estimate (finetune/memory.py), made before training


def trl_config(recipe: Recipe, stage):
    """The stage's TRL config: the recipe's `train` keys over our defaults, plus keys the recipe owns elsewhere."""
    dtype = models.resolve_dtype(recipe.model.dtype)
    # Redacted, so that no tracker is given a secret (e.g. a token pasted into run_name) to log.
    args = redact(dict(recipe.train.args))
    args.setdefault("run_name", run_name(recipe))
    args.setdefault("bf16", dtype == torch.bfloat16)
    args.setdefault("fp16", dtype == torch.float16 and torch.cuda.is_available())
    args.setdefault("use_cpu", not torch.cuda.is_available())
    # SFT's held-out batches take the training batch's rows unless set: at TRL's default (8 rows) the step-0 and
    # final evaluations' larger tensors fit none of the holes that training's leave in the CPU heap, which then grew
    # past the training peak. (Set here, not in the recipe, so runs recorded without it still resume unchanged.)
    if recipe.train.stage == "sft":
        args.setdefault("per_device_eval_batch_size", args.get("per_device_train_batch_size", 8))
    config_cls = stages.config_class(recipe.train.stage)
    try:
        return config_cls(output_dir=str(Path(recipe.output_dir) / "checkpoints"), seed=recipe.seed,
                          **stage.config_kwargs(recipe), **args)
    except ValueError as e:  # TRL/transformers' own range and combination checks
        raise FinetuneError(f"{recipe.source}: train: {e}") from None
    except (TypeError, ArithmeticError) as e:  # values a check does not expect, e.g. num_generations: 0 or null
        raise FinetuneError(f"{recipe.source}: train: the stage's TRL config cannot take these values "
                            f"({type(e).__name__}: {e}); check the train keys against its documentation") from None


def run_name(recipe: Recipe) -> str:
    """The trackers' name for the run: train.run_name (secrets redacted), else the run directory's name."""
    return redact(recipe.train.args.get("run_name")) or Path(recipe.output_dir).resolve().name


def build(recipe: Recipe, callbacks=()) -> Built:
    from accelerate import PartialState

    stage = stages.get(recipe.train.stage)
    distributed.check_launch(recipe)  # FSDP/DeepSpeed launches this run cannot honour, before anything loads
    # --- Trainer arguments first: under accelerate, the process rank is known only once they exist.
    args = trl_config(recipe, stage)
    state = PartialState()
    init = _init_run(recipe)

    # --- Model folder and tokenizer (a continued run's, with its chat tokens). The main process converts the
    # embedded model, or trains a scratch model's tokenizer; the others wait.
    from_scratch = recipe.model.name == SCRATCH
    init_adapter = Path(recipe.model.init_from) / init.get("adapter", "adapter") if init else None
    if init_adapter is not None:
        trust.check_adapter_folder(init_adapter, "model.init_from adapter")  # safetensors only, never a pickle
    with state.main_process_first():
        if from_scratch:
            model_path, tokenizer = None, scratch.load_tokenizer(recipe)
        else:
            model_path = models.resolve_model(recipe.model.name)
            tokenizer = models.load_tokenizer(str(init_adapter or model_path), recipe.model.trust_remote_code,
                                              None if init_adapter else recipe.model.revision,
                                              recipe.model.code_revision)
    try:
        chat = templates_lib.resolve(tokenizer, recipe.data.chat_template, recipe.data.assistant_only_loss)
    except FinetuneError as e:
        raise FinetuneError(f"{recipe.source}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels are padded with -100, so EOS stays trained
    # TRL renders preference and prompt rows with the tokenizer's template; the adapter is saved with it too.
    tokenizer.chat_template = chat.inference

    # --- Data: checked and converted to the stage's rows (built once, by the main process).
    with state.main_process_first():
        prepared = stage.prepare(recipe, tokenizer, chat, recipe.seed)

    # --- Model and adapter: a fresh one, or the adapter of init_from, trained further.
    model = (scratch.build_model(recipe, tokenizer) if from_scratch else
             models.load_model(recipe.model, recipe.quantization, model_path, task=stage.TASK))
    new_token_ids = None
    if chat.added_tokens:
        if getattr(model.config, "tie_word_embeddings", False) and recipe.adapter.type == "lora":
            # peft wraps a tied head in a trainable-tokens layer that TRL's fused loss cannot read (no .bias).
            raise FinetuneError(
                f"{recipe.source}: the model ties its head to its embeddings and its vocabulary lacks the chat "
                f"tokens {chat.added_tokens}; training new token rows on a tied head is not supported with LoRA. "
                "Pick a data.chat_template whose tokens the vocabulary has, or use adapter.type: none"
            )
        new_token_ids = tokenizer.convert_tokens_to_ids(chat.added_tokens)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        peft_config = None
    else:
        peft_config = models.lora_config(recipe.adapter, new_token_ids, stage.TASK)
    run_callback = RunCallback(Path(recipe.output_dir), state.is_main_process)
    # Before the run callback, so that a count of skipped steps reaches metrics.jsonl.
    guard = NonFiniteGuard(recipe.train.on_nonfinite, recipe.train.max_nonfinite_skips)
    try:
        trainer = stage.build_trainer(model, args, prepared, tokenizer, peft_config,
                                      [guard, run_callback, *callbacks], recipe)
    except ValueError as e:
        if "target modules" in str(e).lower() or "not found in the base model" in str(e):
            raise FinetuneError(
                f"{recipe.source}: adapter.target_modules = {recipe.adapter.target_modules}: {e}. Use module "
                "names of this model (e.g. q_proj, v_proj) or all-linear"
            ) from None
        raise
    fitted = memory.fit_cuda_batch(trainer, recipe, prepared, recipe.train.gpu_tokens_per_step)
    if fitted and state.is_main_process:
        print(fitted, flush=True)
    console.use_console_line(trainer, run_callback.tokens_per_second)
    guard.install(trainer)
    checkpoints.install(trainer)
    # TRL casts adapters of quantized models to bf16; keep them (and so the optimizer state) as the recipe says.
    # Modules trained in full (modules_to_save: a head, a reward model's score head) compute in the dtype of the
    # hidden states they read.
    adapter_dtype = torch.float32 if recipe.adapter.dtype == "fp32" else torch.bfloat16
    compute_dtype = models.resolve_dtype(recipe.model.dtype)
    for name, param in trainer.model.named_parameters():
        want = compute_dtype if ".modules_to_save." in name else adapter_dtype
        if param.requires_grad and param.dtype != want:
            param.data = param.data.to(want)
    if init_adapter is not None:
        # The continued adapter exactly as saved: TRL rounded it to bf16 for a quantized base after copying it into
        # its frozen reference, so without this the policy would start a rounding away from its reference.
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(trainer.model, load_file(init_adapter / "adapter_model.safetensors"),
                                  adapter_name="default")
    return Built(trainer, prepared, chat, run_callback, state, stage, init, guard)


def _init_run(recipe: Recipe) -> dict | None:
    """run.json of the run whose adapter this one continues: completed, on the same base."""
    if not recipe.model.init_from:
        return None
    if Path(recipe.model.init_from).resolve() == Path(recipe.output_dir).resolve():
        raise FinetuneError(f"{recipe.source}: model.init_from and output_dir are the same folder; a continued run "
                            "writes a new run directory (e.g. output_dir=runs/NAME-dpo)")
    init = read_completed_run(recipe.model.init_from, f"{recipe.source}: model.init_from")
    if (init.get("recipe") or {}).get("adapter", {}).get("type") == "none":
        raise FinetuneError(f"{recipe.source}: model.init_from {recipe.model.init_from} trained every weight "
                            "(adapter.type none): there is no adapter to continue; use its model folder "
                            f"{recipe.model.init_from}/{init.get('model', 'model')} as model.name instead")
    if init.get("stage") == "reward" and recipe.train.stage != "reward":
        raise FinetuneError(f"{recipe.source}: model.init_from {recipe.model.init_from} is a reward model; a "
                            f"{recipe.train.stage} policy continues a causal-LM run (sft, dpo, kto, grpo, rloo)")
    if recipe.train.stage == "reward" and init.get("stage") != "reward":
        raise FinetuneError(f"{recipe.source}: model.init_from {recipe.model.init_from} is a {init.get('stage')} run; "
                            "a reward model continues only a reward run (its score head)")
    base = init["base_model"]["name"]
    if base != recipe.model.name:
        raise FinetuneError(f"{recipe.source}: model.name = {recipe.model.name!r} but model.init_from "
                            f"{recipe.model.init_from} was trained on {base!r}; set model.name: {base}")
    return init


def train(recipe: Recipe, callbacks=()) -> Path:
    run_dir = Path(recipe.output_dir)
    # Early, before slow loading; by the first process only (RANK is set by accelerate/torchrun before the trainer
    # exists), since the others may start after rank 0's trainer has made output_dir/checkpoints.
    if int(os.environ.get("RANK", "0")) == 0:
        check_output_dir(run_dir, recipe.train.resume, recipe.overwrite, recipe.source)
    # The trackers' callbacks read where to log when the trainer is built and when training begins.
    with trackers.local_trackers(run_dir, trackers.named(recipe.train.args.get("report_to")), run_name(recipe)):
        return _train(recipe, run_dir, callbacks)


def _train(recipe: Recipe, run_dir: Path, callbacks) -> Path:
    built = build(recipe, callbacks)
    trainer, state = built.trainer, built.state

    # --- A resume: the checkpoint it continues, refused if the recipe, data or libraries changed (unless the recipe
    # says so); later checkpoints set aside, metrics logged after the checkpoint dropped (they are logged again).
    built.resume_from = _resume_checkpoint(recipe, run_dir, built) if recipe.train.resume is not False else None
    if built.resume_from:  # every process, before the Trainer unpickles its optimizer, scheduler and RNG states
        trust.check_checkpoint(built.resume_from, f"{recipe.source}: train.resume")
        pinned = memory.pin_resumed_batch(trainer, recipe, built.resume_from)
        if pinned and state.is_main_process:
            print(pinned, flush=True)
    # --- The run directory (checked above): replaced (overwrite=true) only now that the recipe, model and data
    # have all loaded, so a failing recipe never costs the previous run.
    if state.is_main_process:
        if recipe.overwrite:
            clear_output_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if built.resume_from:
            done = checkpoints.prepare_resume(run_dir, built.resume_from)
            moved = f"; later checkpoints set aside in checkpoints/{done['aside_dir']}" if done["set_aside"] else ""
            print(f"Resuming from {built.resume_from.name}{moved}", flush=True)
    state.wait_for_everyone()
    init = built.init_run
    chain = [*(init.get("chain") or [{"stage": init["stage"], "run_dir": recipe.model.init_from}])] if init else []
    record = RunRecord(run_dir, state.is_main_process, {
        "stage": recipe.train.stage,
        "recipe": recipe.to_dict(),
        "recipe_file": recipe.source,
        "base_model": ({"name": SCRATCH, "path": None, "hub_id": None,
                        "tokenizer": trainer.processing_class.name_or_path} if recipe.model.name == SCRATCH else
                       {"name": recipe.model.name, "path": models.resolve_model(recipe.model.name),
                        "hub_id": models.hub_id_of(recipe.model.name),
                        # The base's own Python code that ran (trust_remote_code): later loads check it is unchanged.
                        "code_sha256": trust.check_model_code(models.resolve_model(recipe.model.name), True,
                                                              recipe.model.revision, recipe.model.code_revision)
                        if recipe.model.trust_remote_code else None}),
        "init_from": {"run_dir": recipe.model.init_from, "stage": init["stage"],
                      "adapter_sha256": init.get("adapter_sha256")} if init else None,
        # The stages that trained this run's adapter, oldest first: export merges their one adapter into the base.
        "chain": [*chain, {"stage": recipe.train.stage, "run_dir": str(run_dir)}],
        "chat_template": {"family": built.chat.family, "added_tokens": built.chat.added_tokens,
                          "end_of_turn": _end_of_turn(trainer.processing_class, built.chat)},
        "data": built.prepared.stats,
        "dataset_hashes": built.prepared.hashes,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "world_size": state.num_processes,
        "device": str(trainer.args.device),
        # Who writes this run: a "running" run whose process is gone reads as interrupted (rundir.read_run).
        "process": {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": process_start_ticks(os.getpid())},
        "resumed_from": built.resume_from.name if built.resume_from else None,
    })
    built.estimate = estimate = memory.estimate(trainer, recipe, built.prepared)
    record.update(memory_estimate_mib=estimate)
    _print_data_summary(built.prepared.stats, state.is_main_process)
    if state.is_main_process:
        print(f"Memory: peak estimated at {estimate['total'] / 1024:.2f} GiB (finetune/memory.py)", flush=True)
    try:
        summary, processes = _train_and_save(built, recipe, run_dir)
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt) or built.callback.interrupted
        record.update(status="interrupted" if interrupted else "failed", error=f"{type(e).__name__}: {e}",
                      step=trainer.state.global_step, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        raise
    finally:
        built.callback.restore_signal_handlers()
    weights = _weights_folder(trainer)
    digest = _weights_hash(run_dir / weights) if state.is_main_process else None
    record.update(status="completed", summary=summary, processes=processes, **{weights: weights},
                  **{f"{weights}_sha256": digest}, ended=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if state.is_main_process:
        print(json.dumps(summary, indent=2))
        print(f"Run directory: {run_dir}\nLoss curve:    {run_dir / 'loss_curve.png'}")
    return run_dir


def _train_and_save(built: Built, recipe: Recipe, run_dir: Path):
    trainer, prepared, stage, callback, state = built.trainer, built.prepared, built.stage, built.callback, built.state
    # --- Held-out figures before training, so the run shows what it changed.
    before = stage.held_out(trainer, prepared)

    # --- Train. SIGINT/SIGTERM save a checkpoint and stop at the end of the current step.
    callback.install_signal_handlers()
    start = time.time()
    if built.resume_from and 0 < trainer.args.max_steps <= checkpoints.step_of(built.resume_from):
        # The training had ended at this checkpoint (its final save failed, say): its weights, and no further step
        # (the Trainer would take one more, since it checks max_steps only after a step).
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(built.resume_from))
        trainer.state = TrainerState.load_from_json(str(built.resume_from / checkpoints.LAST_FILE))
        result = None
    else:
        try:
            result = trainer.train(resume_from_checkpoint=str(built.resume_from) if built.resume_from else None)
        finally:
            fastpath.release_kept_buffers()  # the fast step's CPU loss buffers, kept between steps
    seconds = time.time() - start
    processes = _per_process_counts(trainer, callback)
    if callback.interrupted and trainer.state.global_step < trainer.state.max_steps:  # at the last step: completed
        raise FinetuneError(
            f"training interrupted by {callback.interrupted} at step {trainer.state.global_step}; a checkpoint "
            f"is in {run_dir}/checkpoints. Continue with: finetune train {recipe.source} train.resume=true "
            f"output_dir={run_dir}"
        )

    # --- Held-out figures after, and the adapter (or the whole model) with the model's own inference template.
    after = stage.held_out(trainer, prepared)
    if state.is_main_process and after:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")  # now with the final held-out loss
    adapter_dir = run_dir / _weights_folder(trainer)
    trainer.processing_class.chat_template = built.chat.inference
    if adapter_dir.name == "model":
        _ready_for_generation(trainer.model, trainer.processing_class, built.chat)
    with contextlib.ExitStack() as stack:  # written aside by the main process, published whole by one rename
        target = stack.enter_context(staged_dir(adapter_dir, replace=True)) if state.is_main_process else adapter_dir
        try:
            if trainer.is_fsdp_enabled:  # each process holds a shard of every weight: gather, rank 0 writes
                distributed.save_gathered(trainer.model, target, state.is_main_process, trainer.processing_class)
            else:
                trainer.save_model(str(target))
        except OSError as e:  # e.g. a full disk: nothing of it is published (staged_dir removes the part written)
            last = checkpoints.published(run_dir / "checkpoints")
            kept = f"the last checkpoint, checkpoints/checkpoint-{max(last)[0]}," if last else "no checkpoint"
            raise FinetuneError(f"saving {adapter_dir} failed ({e}); nothing of it was published, and {kept} is "
                                "intact. Free space and resume with train.resume=true") from e
        if state.is_main_process:
            # The Trainer pickles its arguments and peft writes a blank model card; run.json holds both instead,
            # and the adapter folder stays safetensors + JSON only. TRL's frozen copy of an init_from adapter (its
            # reference model) is saved as ref/: run.json's init_from names that run instead.
            (target / "training_args.bin").unlink(missing_ok=True)
            (target / "README.md").unlink(missing_ok=True)
            shutil.rmtree(target / "ref", ignore_errors=True)
            distributed.check_weights_saved(target, run_dir)  # never "completed" without weights
    state.wait_for_everyone()

    history = [row for row in trainer.state.log_history if "loss" in row]
    rate = callback.tokens_per_second()
    summary = {
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, trainer.state.global_step), 2),
        "train_loss_first": history[0]["loss"] if history else None,
        "train_loss_last": history[-1]["loss"] if history else None,
        "train_loss_mean": result.training_loss if result else None,
        **stage.summary(before, after, history),
        # Input tokens (TRL's count, all processes) per second, from the first to the last logged step.
        "tokens_per_second": round(rate, 1) if rate else None,
        "peak_memory_mib": _peak_memory_mib(),
        "peak_memory_estimate_mib": built.estimate["total"] if built.estimate else None,
        "nonfinite_skips": built.guard.skips if built.guard else 0,
        "resumed_from": built.resume_from.name if built.resume_from else None,
    }
    if hasattr(stage, "throughput"):
        summary.update(stage.throughput(trainer, rate, prepared))
    return summary, processes


def _resume_checkpoint(recipe: Recipe, run_dir: Path, built: Built) -> Path:
    """The checkpoint train.resume names, after checking that the recipe, data and libraries are the run's."""
    checkpoint = checkpoints.resume_target(run_dir, recipe.train.resume, recipe.source)
    previous = read_run(run_dir)
    if previous.get("status") == "running" and (previous.get("process") or {}).get("host") == socket.gethostname():
        raise FinetuneError(f"{recipe.source}: train.resume: the run in {run_dir} is still running (pid "
                            f"{previous['process'].get('pid')}); stop it (SIGTERM saves a checkpoint) before resuming")
    differences = checkpoints.resume_differences(previous, redact(recipe.to_dict()), built.prepared.hashes,
                                                 package_versions())
    if differences and not recipe.train.resume_changes:
        raise FinetuneError(
            f"{recipe.source}: train.resume: {run_dir} was trained with something else: {'; '.join(differences)}. "
            "Resume with the run's recipe, data and libraries (run.json), or set train.resume_changes=true if the "
            "change is intended"
        )
    if differences and built.state.is_main_process:
        print(f"Resuming with changes (train.resume_changes): {'; '.join(differences)}", flush=True)
    return checkpoint


def eval_loss(trainer, prepared) -> dict | None:
    """Held-out loss (and TRL's other eval metrics): the default held-out figures of a stage."""
    if prepared.eval is None:
        return None
    return {k: v for k, v in trainer.evaluate(metric_key_prefix="eval").items()
            if isinstance(v, (int, float)) and not k.endswith(("_runtime", "_per_second"))}


def _end_of_turn(tokenizer, chat) -> str | None:
    try:
        return tokenizer.convert_ids_to_tokens(templates_lib.end_of_turn_token_id(tokenizer, chat.training))
    except (FinetuneError, ValueError, TypeError):
        return None  # a template whose turn end cannot be found (assistant_only_loss: false): export uses EOS


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


def _weights_folder(trainer) -> str:
    """Where a run's trained weights go: adapter/ (LoRA) or model/ (every weight trained: an HF model folder)."""
    from peft import PeftModel

    return "adapter" if isinstance(trainer.model, PeftModel) else "model"


def _ready_for_generation(model, tokenizer, chat) -> None:
    """A fully trained model saved as a normal HF model: its cache on, and generation stopping at EOS and at the
    chat template's end-of-turn token, padding with the tokenizer's pad token."""
    model.config.use_cache = True
    stops = [tokenizer.eos_token_id]
    end = _end_of_turn(tokenizer, chat)
    if end is not None:
        stops.append(tokenizer.convert_tokens_to_ids(end))
    eos = model.generation_config.eos_token_id
    stops += eos if isinstance(eos, list) else [eos] if eos is not None else []
    model.generation_config.eos_token_id = sorted({i for i in stops if i is not None})
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def _weights_hash(folder: Path) -> str | None:
    """sha256 of the adapter's weights, or of a full model's (all its safetensors files, in name order)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _print_data_summary(stats: dict, is_main: bool) -> None:
    if not is_main:
        return
    overlap = stats.get("overlap") or {}
    tokens = (f" ({stats['train_tokens']} tokens, {stats['trained_tokens']} trained)"
              if "train_tokens" in stats else "")
    truncated = f"{stats['truncated']} truncated, " if "truncated" in stats else ""
    print(
        f"Data: {stats['train_rows']} training rows{tokens}, {stats['eval_rows']} held-out rows; "
        f"{truncated}{stats['dropped']} dropped; held-out overlap: {overlap.get('exact', 0)} exact"
        + (f", {overlap['near']} near-duplicate" if "near" in overlap else ""),
        flush=True,
    )
