"""An estimate of a training run's peak memory, made once everything is loaded and before the first step.

    finetune validate RECIPE     prints it;  finetune train RECIPE    records it in run.json beside the measured peak

peak = what the process holds now (libraries, base weights, data: RSS on CPU once the allocator has returned what
       loading freed, allocated memory on CUDA)
     + trainable weights' gradients and AdamW state (fp32 moments: 8 bytes per trained parameter, + its gradient)
     + activations kept for backward: tokens per step x layers x hidden size x BYTES_PER_ACTIVATION
     + logits: positions scored per step (the fast path: trained positions only) x vocabulary x BYTES_PER_LOGIT,
       or, where the fast step's loss computes them a chunk at a time, one chunk's: LOSS_CHUNK x vocabulary x
       BYTES_PER_CHUNK_LOGIT
     Preference stages count the chosen and the rejected sequence of every pair.

Tokens per step: batch x max_length for packed rows, else batch x the longest tokenized row (capped at max_length).
The constants were fitted to measured peaks on this project's CPU (below) and checked on QLoRA SFT and on the
tiny pretraining recipe, which were not used to fit them; the README has the figures. On CUDA (allocated memory,
no allocator slack) the fast step's activations have their own constants, per hidden and per MLP unit, fitted to
GPU runs (below); other steps there keep the CPU's, which run high.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch

from finetune import checkpoints, fastpath

# Fitted to measured peak RSS on this project's CPU (`finetune bench`, 2026-11-27): bytes per (token x layer x
# hidden unit) of a step: what is kept for backward, the transient work of attention and the MLP, allocator slack
# (fast: SFT on json_extract and bench_chat with LoRA; plain: TRL's step, DPO); bytes per computed logit where the
# logits exist whole (TRL's step: the head's output, fp32 log-softmax, gradient; the fast step's small-vocabulary
# path, pretraining's); and bytes per logit of the one chunk at a time that the fast step's loss holds otherwise.
# The fast path's activation constant rose (65 -> 100) when its loss stopped holding logits: what the chat set's
# longer rows hold besides saved tensors now shows in it; refitted to 85 on the four SFT runs of a later bench (LoRA
# and QLoRA, json_extract and bench_chat, QLoRA at one row per forward). Checked on pretraining, DPO and the demo.
BYTES_PER_ACTIVATION = {"fast": 85, "plain": 68}
# A layer under activation checkpointing (train.activation_checkpointing; activation_checkpointing_kwargs'
# every_n_layers checkpoints every n-th layer, the others keep theirs): bytes per (token x layer x hidden unit), its
# saved input and its share of a layer's recomputation and the allocator slack, fitted to two LoRA SFT runs of the
# shipped recipe (bench_chat at 2,048 tokens a step, json_extract at 1,024: +5% and -1%) and checked on the QLoRA
# recipe (+11%); without it those runs' estimates were twice their peak.
BYTES_PER_CHECKPOINTED_LAYER = 30
# CUDA (allocated memory: no RSS, no allocator slack), the fast step: bytes kept per token and layer for each hidden
# unit (norms' inputs and outputs, q/k/v/attention output, residual) and each MLP unit (gate, up and down's input),
# fitted to the H200 runs of 2026-11-27 (SmolLM2-135M and the 1B Llama shape, LoRA at ~16k tokens a step: 30 and
# 37.5 bytes per hidden unit in all) and checked on the 1B's QLoRA, the 1B at 32k tokens and the 135M checkpointed
# (+8%, +9%, 0% with the margin), all bf16. A checkpointed layer keeps its bf16 input, and one layer recomputes at
# a time.
CUDA_BYTES_PER_HIDDEN = 15.3
CUDA_BYTES_PER_MLP_UNIT = 5.55
# What LoRA layers no longer keep where they recompute their inputs in backward (fastpath._LoRAIn; every device but
# the CPU): the two norms' bf16 outputs per hidden unit, SwiGLU's per MLP unit.
CUDA_RECOMPUTED_PER_HIDDEN = 4
CUDA_RECOMPUTED_PER_MLP_UNIT = 2
CUDA_BYTES_PER_CHECKPOINTED_HIDDEN = 2
CUDA_MARGIN = 1.1  # what the fit does not model: how full the packed rows are, transient buffers
# The constants are for bf16/fp16 activations; an fp32 model's are twice the bytes (scaled by the embeddings' dtype).
BYTES_PER_LOGIT = {"fast": 16, "plain": 33}
BYTES_PER_CHUNK_LOGIT = 12


def current_mib() -> float:
    """Memory the process holds now: allocated CUDA memory, or the resident set on CPU once the C allocator has
    returned what loading freed (`release_freed`)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    release_freed()
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_freed() -> None:
    """Hands memory that was freed but kept by glibc's allocator back to the system (malloc_trim). Loading a 4-bit
    model frees ~250 MB of transient buffers that glibc keeps as resident (SmolLM2-135M QLoRA: 909 -> 662 MiB); the
    training step reuses that memory first, so counted in "now" it was counted twice (QLoRA SFT's estimate read
    +29 to +37% before). A no-op where the C library has no malloc_trim (not glibc)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def estimate(trainer, recipe, prepared) -> dict:
    """Peak memory of the coming run in MiB, by part."""
    model = trainer.model
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers, hidden, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = trainer.args.per_device_train_batch_size
    max_length = recipe.data.max_length or 1024
    stage = recipe.train.stage
    preference = stage in ("dpo", "kto", "reward")
    if recipe.data.packing and stage == "sft" or stage == "pretrain":
        tokens = batch * max_length
    else:
        tokens = batch * min(max_length, _longest(trainer.train_dataset) or max_length)
    if preference:
        tokens *= 2  # chosen and rejected (KTO: completion and its mismatched reference pair)
    fast = recipe.train.fast_path and stage in ("sft", "pretrain")
    stats = prepared.stats or {}
    trained_share = (stats.get("trained_tokens") or 0) / stats["train_tokens"] if stats.get("train_tokens") else 1.0
    scored = tokens * (trained_share if fast and stage == "sft" else 1.0)  # positions whose logits are computed
    device = trainer.args.device.type
    head = fastpath._plain_head(model) if fast else None
    fused = head is not None and fastpath.head_in_loss(vocab, scored, device)
    if fused:  # the head's matmul inside the chunked loss
        chunk = fastpath.LOSS_CHUNK_CUDA if device == "cuda" else fastpath.LOSS_CHUNK
        logits = min(scored, chunk) * vocab * BYTES_PER_CHUNK_LOGIT
        if head.weight.requires_grad:  # its weight's gradient, a step's fp32 sum (and on the CPU two kept parts)
            logits += head.weight.numel() * (4 + (6 if device == "cpu" else 0))
    else:
        logits = scored * vocab * BYTES_PER_LOGIT["fast" if fast else "plain"]
    recomputed = checkpointed_layers(trainer.args, layers)
    if fast and torch.cuda.is_available() and not getattr(trainer.args, "use_cpu", False):
        mlp = getattr(config, "intermediate_size", None) or 4 * hidden
        layer = CUDA_BYTES_PER_HIDDEN * hidden + CUDA_BYTES_PER_MLP_UNIT * mlp
        if fastpath.recomputes_lora_inputs(model, "cuda"):
            layer -= CUDA_RECOMPUTED_PER_HIDDEN * hidden + CUDA_RECOMPUTED_PER_MLP_UNIT * mlp
        kept = (layers - recomputed) * layer + recomputed * CUDA_BYTES_PER_CHECKPOINTED_HIDDEN * hidden \
            + (layer if recomputed else 0)
        embeddings = getattr(model.get_input_embeddings(), "weight", None)
        width = embeddings.element_size() / 2 if embeddings is not None and embeddings.is_floating_point() else 1.0
        activations = tokens * kept * CUDA_MARGIN * width
    else:
        activations = tokens * hidden * ((layers - recomputed) * BYTES_PER_ACTIVATION["fast" if fast else "plain"]
                                         + recomputed * BYTES_PER_CHECKPOINTED_LAYER)
    parts = {
        "now": current_mib(),
        "gradients_and_optimizer": trained * (4 + 8) / 2**20,
        "activations": activations / 2**20,
        "logits": logits / 2**20,
    }
    parts = {k: round(v, 1) for k, v in parts.items()}
    parts["total"] = round(sum(parts.values()), 1)
    parts["tokens_per_step"] = int(tokens)
    return parts


def checkpointed_layers(args, layers: int) -> int:
    """How many of the model's layers recompute their forward in backward (transformers checkpoints the layers whose
    index is a multiple of every_n_layers)."""
    if not getattr(args, "activation_checkpointing", False):
        return 0
    every = int((getattr(args, "activation_checkpointing_kwargs", None) or {}).get("every_n_layers", 1) or 1)
    return len(range(0, layers, max(1, every)))


# DataLoader worker processes that collate packed SFT's batches on CUDA (where the recipe leaves
# train.dataloader_num_workers at 0): the host's collation (~5 ms of a 1B model's ~250 ms step on an H200, the GPU idle
# meanwhile) moves off the step's critical path.
CUDA_LOADER_WORKERS = 2


def fit_cuda_batch(trainer, recipe, prepared, tokens_per_step: int | None, share: float = 0.85) -> str | None:
    """On CUDA, packed SFT: the per-device batch raised from the recipe's to `tokens_per_step` tokens per optimizer
    step (batch x max_length x gradient accumulation steps), or to as many rows as the estimate above fits in
    `share` of the GPU's free memory, whichever is fewer; never below the recipe's batch. Where the whole optimizer
    step's rows fit in one forward, a recipe's gradient accumulation is folded into the batch: the same rows, loss
    and update in one forward and backward instead of several (each costs the host its kernel launches). Evaluation
    takes at least as many rows. Batches are collated by CUDA_LOADER_WORKERS worker processes (persistent) where the
    recipe has none. Returns what was done, for the log (None: nothing)."""
    args = trainer.args
    if not _fits_cuda_batch(trainer, recipe, tokens_per_step):
        return None
    batch, length, accumulation = args.per_device_train_batch_size, recipe.data.max_length or 1024, \
        args.gradient_accumulation_steps
    now = estimate(trainer, recipe, prepared)
    per_row = (now["activations"] + now["logits"]) / batch  # MiB, linear in the rows of a step
    free = torch.cuda.mem_get_info()[0] / 2**20
    fits = int((share * free - now["gradients_and_optimizer"]) // per_row) if per_row > 0 else batch
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # one batch for every rank
        least = torch.tensor([fits], device=args.device)
        torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
        fits = int(least.item())
    wanted = max(1, tokens_per_step // (length * accumulation))  # rows per forward, as the recipe accumulates
    chosen, folded = max(batch, min(wanted, fits)), accumulation
    if accumulation > 1 and chosen == wanted and wanted * accumulation <= fits:
        chosen, folded = wanted * accumulation, 1
    # For a resume (pin_resumed_batch): the recipe's batches and accumulation, and the rows the estimate fits now.
    trainer.finetune_recipe_batches = (batch, args.per_device_eval_batch_size)
    trainer.finetune_recipe_accumulation = accumulation
    trainer.finetune_fitting_rows = fits
    workers = ""
    if args.dataloader_num_workers == 0:  # the recipes' default (an explicit 0 reads the same); 1 or more: the recipe's
        args.dataloader_num_workers, args.dataloader_persistent_workers = CUDA_LOADER_WORKERS, True
        # The fast tokenizer's threads were used before the fork: its per-worker warning, and its own fallback.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        workers = f"; the next batches collated by {CUDA_LOADER_WORKERS} DataLoader workers while a step runs"
    if chosen == batch and folded == accumulation:
        return f"CUDA: {workers[2:]} (train.gpu_tokens_per_step: null keeps the recipe's loader)" if workers else None
    _set_batch(trainer, chosen, max(args.per_device_eval_batch_size, chosen), folded)  # no-grad: fits as training
    limit = ("train.gpu_tokens_per_step" if chosen * folded == wanted * accumulation
             else f"as many rows as the memory estimate fits in {share:.0%} of {free / 1024:.1f} GiB free")
    fold = f", gradient accumulation {accumulation} -> 1 (the same rows a step, one forward)" if folded == 1 \
        and accumulation > 1 else ""
    tokens = chosen * length * folded
    return (f"CUDA: per-device batch {batch} -> {chosen}{fold}, {tokens:,} tokens per optimizer step ({limit}"
            f"{workers}; train.gpu_tokens_per_step: null keeps the recipe's batch)")


def pin_resumed_batch(trainer, recipe, checkpoint) -> str | None:
    """A resumed run where `fit_cuda_batch` applies keeps the batch its checkpoint was trained with (trainer_state.json
    records it), not what the GPU's free memory fits now: the same rows a step, so the same data order and steps as
    the run it continues; never below the recipe's batch (one changed under train.resume_changes), evaluation at the
    rows it had. A recorded batch of more rows than the token budget allows with the recipe's accumulation was
    trained with the accumulation folded in (`fit_cuda_batch`), and is resumed so. Returns what was done, for the
    log (None: nothing)."""
    tokens_per_step = recipe.train.gpu_tokens_per_step
    if not _fits_cuda_batch(trainer, recipe, tokens_per_step):
        return None
    args, name = trainer.args, Path(checkpoint).name
    recipe_rows, recipe_eval = getattr(trainer, "finetune_recipe_batches",
                                       (args.per_device_train_batch_size, args.per_device_eval_batch_size))
    accumulation = getattr(trainer, "finetune_recipe_accumulation", args.gradient_accumulation_steps)
    saved = json.loads((Path(checkpoint) / checkpoints.LAST_FILE).read_text()).get("train_batch_size")
    if not saved:
        return (f"CUDA: {name} records no batch; the batch fitted now ({args.per_device_train_batch_size} rows) may "
                "not be the one it was trained with, and the data order then differs from the run it continues")
    rows = saved // max(1, args.n_gpu)
    folded = 1 if rows * accumulation * (recipe.data.max_length or 1024) > tokens_per_step else accumulation
    if rows == args.per_device_train_batch_size and folded == args.gradient_accumulation_steps or rows < recipe_rows:
        return None
    before, before_accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    _set_batch(trainer, rows, max(recipe_eval, rows), folded)
    fits = getattr(trainer, "finetune_fitting_rows", None)
    short = (f"; more than the {fits} the memory estimate fits in the GPU's free memory now: free GPU memory if it "
             "runs out") if fits is not None and rows > fits else ""
    fold = f", gradient accumulation {before_accumulation} -> {folded}" if folded != before_accumulation else ""
    return f"CUDA: per-device batch {before} -> {rows}{fold}, the batch {name} was trained with{short}"


def _fits_cuda_batch(trainer, recipe, tokens_per_step) -> bool:
    # Not under DeepSpeed: its configuration took the batch and accumulation when the trainer was made.
    return tokens_per_step is not None and torch.cuda.is_available() and recipe.train.stage == "sft" \
        and recipe.data.packing and not trainer.args.use_cpu and not getattr(trainer, "is_deepspeed_enabled", False)


def _set_batch(trainer, rows: int, eval_rows: int, accumulation: int | None = None) -> None:
    args = trainer.args
    args.per_device_train_batch_size = rows
    trainer._train_batch_size = args.train_batch_size  # what Trainer built from the batch size (its dataloader's)
    args.per_device_eval_batch_size = eval_rows
    if accumulation is not None:  # read by the training loop when it starts
        args.gradient_accumulation_steps = accumulation


def _longest(dataset, sample: int = 5000) -> int | None:
    """The longest tokenized row among the first `sample` rows (a pair: prompt + its longer answer)."""
    columns = set(getattr(dataset, "column_names", None) or [])
    rows = dataset.select(range(min(sample, len(dataset)))) if columns else []
    if "input_ids" in columns:
        return max(len(ids) for ids in rows["input_ids"])
    prompt = next((c for c in ("prompt_ids", "prompt_input_ids") if c in columns), None)
    if prompt:
        answers = [c for c in ("chosen_ids", "rejected_ids", "completion_ids", "chosen_input_ids",
                               "rejected_input_ids", "completion_input_ids") if c in columns]
        return max(len(row[prompt]) + max(len(row[c]) for c in answers) for row in rows) if answers else None
    return None
