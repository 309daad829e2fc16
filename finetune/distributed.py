"""Sharded training (FSDP2, DeepSpeed ZeRO): what a run checks before loading, and how it saves its weights.

`accelerate launch` tells each process it starts how to shard through its environment: ACCELERATE_USE_FSDP=true
and FSDP_VERSION for FSDP, ACCELERATE_USE_DEEPSPEED=true and ACCELERATE_DEEPSPEED_ZERO_STAGE for DeepSpeed
(accelerate/utils/launch.py). These are read before anything loads, so a launch the run cannot honour stops at
once with one message.

Saving under FSDP2: each process holds a shard (a DTensor) of every weight. transformers' `Trainer.save_model`
writes nothing at all under accelerate's default `fsdp_state_dict_type: SHARDED_STATE_DICT` (transformers
trainer.py, `save_model`), and under FULL_STATE_DICT gathers the whole model, frozen base included, on the first
process. `save_gathered` gathers only what the adapter folder holds, whatever the state-dict type, so checkpoints
can stay sharded (no gather at every save) and the run still ends with a complete adapter/.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from finetune.errors import FinetuneError


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def sharding() -> str | None:
    """"fsdp" or "deepspeed" when accelerate launched this process to shard the model with them, else None."""
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


def shards_parameters() -> bool:
    """Whether each process holds only a shard of the (frozen) weights: FSDP, or DeepSpeed ZeRO stage 3."""
    kind = sharding()
    return kind == "fsdp" or (kind == "deepspeed" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")


def check_launch(recipe) -> None:
    """Refuse, before anything loads, a sharded launch that this run cannot honour."""
    kind = sharding()
    if kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise FinetuneError(
            f"{recipe.source}: accelerate launched this run with DeepSpeed (ACCELERATE_USE_DEEPSPEED=true, e.g. "
            "recipes/accelerate/zero3.yaml) but the deepspeed package is not installed. Install it with: "
            "pip install 'finetune[deepspeed]'"
        )
    if kind == "fsdp" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise FinetuneError(
            f"{recipe.source}: accelerate launched this run with FSDP version {os.environ.get('FSDP_VERSION', '1')}; "
            "finetune saves the adapter of FSDP2 runs only. Set fsdp_config.fsdp_version: 2 in the accelerate "
            "config (as recipes/accelerate/fsdp2.yaml does)"
        )
    if shards_parameters() and recipe.quantization.bits == 8:
        raise FinetuneError(
            f"{recipe.source}: quantization.bits = 8 under {'FSDP' if kind == 'fsdp' else 'DeepSpeed ZeRO-3'}: "
            "bitsandbytes cannot store 8-bit weights in the float dtype that sharding needs (4-bit weights it can: "
            "FSDP-QLoRA). Use quantization.bits: 4 or null, or launch without sharding (recipes/accelerate/ddp.yaml)"
        )
    if kind is not None and not torch.cuda.is_available():
        raise FinetuneError(
            f"{recipe.source}: accelerate launched this run with {'FSDP' if kind == 'fsdp' else 'DeepSpeed'} on a "
            "machine without CUDA: they shard over GPUs, and on CPU accelerate does not run them as configured. For "
            "several CPU processes use recipes/accelerate/cpu_ddp.yaml (DDP over gloo)"
        )


def quant_storage(dtype: torch.dtype) -> torch.dtype:
    """The dtype bitsandbytes packs 4-bit weights into. FSDP (and ZeRO-3) shard float tensors only, and wrap a
    layer's weights together only when they share one dtype: so, when they shard, the model's own dtype (as the
    bitsandbytes FSDP-QLoRA guide and PEFT's FSDP/ZeRO-3 QLoRA examples set it); otherwise bitsandbytes' default
    uint8. accelerate 1.15 leaves uint8 4-bit weights out of FSDP2 sharding altogether (fsdp2_prepare_model)."""
    return dtype if shards_parameters() else torch.uint8


def adapter_weight_names(model) -> list[str]:
    """The state-dict keys peft may save for `model`'s adapter: the trained weights (LoRA, DoRA magnitudes, modules
    trained in full, new token rows), and the embedding layers, which peft also saves when the vocabulary was
    resized. Not the frozen base. Sorted, so every process gathers them in the same order."""
    trained = {name for name, param in model.named_parameters(remove_duplicate=False) if param.requires_grad}
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    prefixes = tuple(f"{name}." for name, module in model.named_modules(remove_duplicate=False)
                     if any(module is m for m in embeddings))
    return sorted(key for key in model.state_dict() if key in trained or key.startswith(prefixes))


def gather_state_dict(model, keys: list[str] | None, is_main: bool) -> dict[str, torch.Tensor]:
    """`model.state_dict()` (only `keys`, if given) with every FSDP2 shard gathered whole, as CPU tensors on the
    main process; the other processes get {}. A collective: every process calls it, with the same keys."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()  # under FSDP2: sharded DTensors, under the model's own parameter names
    gathered = {}
    for key in keys if keys is not None else list(state):
        value = state[key]
        if isinstance(value, DTensor):
            if value.device.type != value.device_mesh.device_type:  # shards offloaded to the CPU, gathered by NCCL
                value = value.to(value.device_mesh.device_type)
            value = value.full_tensor()  # all-gather: each process contributes its shard
        if is_main:
            gathered[key] = value.detach().to("cpu", copy=True)
    return gathered


def save_gathered(model, folder: Path, is_main: bool, tokenizer=None) -> None:
    """Save a model sharded by FSDP2 as `Trainer.save_model` saves an unsharded one: a peft model's adapter (its
    active one), or the whole model as an HF folder, and the tokenizer. Every process calls it; the main one
    writes."""
    from peft import PeftModel

    is_adapter = isinstance(model, PeftModel)
    weights = gather_state_dict(model, adapter_weight_names(model) if is_adapter else None, is_main)
    if not is_main:
        return
    folder.mkdir(parents=True, exist_ok=True)
    if is_adapter:
        model.save_pretrained(str(folder), state_dict=weights, selected_adapters=[model.active_adapter])
    else:
        model.save_pretrained(str(folder), state_dict=weights)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def check_weights_saved(folder: Path, run_dir: Path) -> None:
    """Refuse to call a run completed when its weights folder holds no tensor: transformers' save_model writes
    nothing under FSDP's SHARDED_STATE_DICT, and an empty adapter file under DeepSpeed ZeRO-3 without 16-bit
    gathering (it falls back to a DeepSpeed checkpoint)."""
    from safetensors import safe_open

    tensors = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors += len(list(f.keys()))
    if not tensors:
        raise FinetuneError(
            f"{folder}: training finished but no weights were saved (no tensor in {folder.name}/*.safetensors); the "
            f"run is marked failed. Its last checkpoint, if any, is in {run_dir}/checkpoints. Under DeepSpeed ZeRO-3 "
            "set zero3_save_16bit_model: true in the accelerate config (recipes/accelerate/zero3.yaml does)"
        )
