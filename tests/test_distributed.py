"""Sharded training: the adapter gathered from FSDP2 shards and saved whole; the launches a run refuses.

accelerate's FSDP does not run on CPU, so the gather-and-save is tested on plain torch FSDP2 (`fully_shard`) over
gloo, in two processes: this file is also the script each of them runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256


def tiny_base():
    """A 2-layer, hidden-64 Llama with tied embeddings, built from a config: the same weights on every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def tiny_lora_model():
    """tiny_base with a LoRA on every linear layer (its A matrices random, the same on every call; B zero)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_base(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def sgd_step(model) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def fsdp_worker(out: Path, rank: int) -> None:
    """One of two processes: shard the model (one FSDP2 unit per layer, and the root), train a step on the same
    batch as an unsharded copy, then gather and save the adapter with finetune's code."""
    import torch.distributed as dist
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard

    from finetune.distributed import save_gathered

    # A file rendezvous: no port to pick, and no launcher process to start.
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    model, reference = tiny_lora_model(), tiny_lora_model()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    sharded = [name for name, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    sgd_step(model)  # both processes see the same batch: the averaged gradient is the unsharded one
    save_gathered(model, out / "adapter", is_main=rank == 0)
    if rank == 0:
        sgd_step(reference)
        reference.eval()
        with torch.no_grad():
            logits = reference(input_ids=batch()).logits
        save_file({**get_peft_model_state_dict(reference), "logits": logits}, str(out / "reference.safetensors"))
        (out / "sharded.json").write_text(json.dumps(sharded))
    dist.barrier()
    dist.destroy_process_group()


def test_adapter_gathered_from_fsdp2_shards_equals_the_unsharded_one(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from finetune.distributed import check_weights_saved

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    workers = [subprocess.Popen([sys.executable, __file__, str(tmp_path), str(rank)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in (0, 1)]
    try:
        for worker in workers:
            output = worker.communicate(timeout=300)[0]
            assert worker.returncode == 0, output[-3000:]
    finally:  # one failed: the other would wait for it
        for worker in workers:
            worker.kill()

    sharded = json.loads((tmp_path / "sharded.json").read_text())
    assert any("lora_B" in name for name in sharded)  # the adapter itself was sharded over the two processes
    expected = load_file(tmp_path / "reference.safetensors")
    reference_logits = expected.pop("logits")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert saved[key].shape == value.shape, key
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert all(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # the step trained every B (zero at init)
    check_weights_saved(tmp_path / "adapter", tmp_path)

    loaded = PeftModel.from_pretrained(tiny_base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch()).logits, reference_logits, rtol=1e-5, atol=1e-5)


def test_a_run_without_saved_weights_is_refused(tmp_path):
    """What transformers leaves under DeepSpeed ZeRO-3 without 16-bit gathering: peft's save of an empty state
    dict, an adapter file with no tensor. Under FSDP's SHARDED_STATE_DICT it writes no folder at all."""
    from finetune.distributed import check_weights_saved
    from finetune.errors import FinetuneError

    tiny_lora_model().save_pretrained(str(tmp_path / "adapter"), state_dict={})
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    for folder in (tmp_path / "adapter", tmp_path / "missing"):
        with pytest.raises(FinetuneError, match=r"no weights were saved .* the run is marked failed"):
            check_weights_saved(folder, tmp_path / "run")


# ----------------------------------------------------------------------------- launches refused or adapted


def _train_exit(tmp_path, capsys, **sections) -> tuple[int, str]:
    """`finetune train` on a recipe, in this process, as accelerate's environment (set by the test) makes it."""
    import yaml

    from finetune.cli import main

    recipe = {"data": {"datasets": ["json_extract"]}, "output_dir": str(tmp_path / "run"), **sections}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["train", str(path)])
    assert not (tmp_path / "run").exists()  # refused before anything was written (or loaded)
    return code, capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_launch_without_deepspeed_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with zero3.yaml sets
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    code, err = _train_exit(tmp_path, capsys)
    assert code == 2
    assert err.strip() == (
        f"finetune: error: {tmp_path / 'recipe.yaml'}: accelerate launched this run with DeepSpeed "
        "(ACCELERATE_USE_DEEPSPEED=true, e.g. recipes/accelerate/zero3.yaml) but the deepspeed package is not "
        "installed. Install it with: pip install 'finetune[deepspeed]'")


def test_fsdp_refuses_8_bit_weights_and_fsdp_version_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    code, err = _train_exit(tmp_path, capsys, quantization={"bits": 8})
    assert code == 2 and "quantization.bits = 8 under FSDP: bitsandbytes cannot store 8-bit weights" in err
    monkeypatch.setenv("FSDP_VERSION", "1")
    code, err = _train_exit(tmp_path, capsys)
    assert code == 2 and "FSDP version 1; finetune saves the adapter of FSDP2 runs only" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fsdp_on_a_machine_without_cuda_is_refused_naming_the_cpu_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    code, err = _train_exit(tmp_path, capsys)
    assert code == 2 and "FSDP on a machine without CUDA" in err and "recipes/accelerate/cpu_ddp.yaml" in err


def test_fsdp_qlora_stores_4_bit_weights_in_the_model_dtype(tiny_llama, monkeypatch):
    """FSDP shards float tensors only: under FSDP the 4-bit weights are packed into bf16 (the model's dtype), as
    the bitsandbytes FSDP-QLoRA guide configures it; without it, into bitsandbytes' default uint8."""
    from finetune.models import load_model
    from finetune.recipe import ModelConfig, QuantizationConfig

    def storage():
        model = load_model(ModelConfig(name=str(tiny_llama), dtype="bf16"), QuantizationConfig(bits=4))
        weight = model.model.layers[0].self_attn.q_proj.weight
        assert type(weight).__name__ == "Params4bit"
        return weight.dtype, model.config.quantization_config.bnb_4bit_quant_storage

    assert storage() == (torch.uint8, torch.uint8)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert storage() == (torch.bfloat16, torch.bfloat16)


if __name__ == "__main__":
    fsdp_worker(Path(sys.argv[1]), int(sys.argv[2]))
