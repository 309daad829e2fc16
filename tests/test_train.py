"""SFT on tiny models: what changes, what must not, and what the run directory records."""

from __future__ import annotations

import json
import os
import platform
import signal
from pathlib import Path

import pytest
import torch
from conftest import CONVERSATIONS, Snapshot, tiny_recipe, write_jsonl
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.stages import sft


def _quant(bits):
    return {"bits": bits} if bits else {"bits": None}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_lora_and_qlora_change_every_adapter_tensor_and_no_base_weight(request, tmp_path, chat_file, arch, bits):
    if arch == "qwen2" and bits == 8:
        pytest.skip("8-bit is covered on llama; qwen2 covers LoRA and QLoRA")
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    snap = Snapshot()
    recipe = tiny_recipe(tmp_path, model_dir, chat_file, quantization=_quant(bits))
    run_dir = sft.main(recipe, callbacks=[snap])
    model = snap.model
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and set(lora) == set(snap.trainable)
    unchanged = [n for n, p in lora.items() if torch.equal(p.detach(), snap.trainable[n])]
    assert unchanged == [], f"LoRA tensors that did not change: {unchanged[:5]}"
    assert all(p.dtype == torch.float32 for p in lora.values())  # adapter (and so Adam state) in fp32
    frozen = dict(model.named_parameters())
    changed = [n for n, before in snap.frozen.items() if not torch.equal(frozen[n].detach(), before)]
    assert changed == [], f"base weights that changed: {changed[:5]}"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["summary"]["steps"] == 3
    assert run["recipe"]["quantization"]["bits"] == bits
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((run_dir / "adapter").glob("*.bin"))
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert len([k for k in saved if "lora_" in k]) == len(lora)


def test_loss_falls_on_a_fixed_batch(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "same.jsonl", [{"messages": CONVERSATIONS[1]}] * 4)
    recipe = tiny_recipe(tmp_path, tiny_llama, data, train={"max_steps": 12, "learning_rate": 5e-2,
                                                             "per_device_train_batch_size": 4})
    run_dir = sft.main(recipe)
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 12
    # A random 2-layer model starts near ln(vocab) = 10.8; LoRA on its linear layers lowers it steadily.
    assert losses[-1] < 0.9 * losses[0], losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_after_generate_every_qlora_tensor_still_gets_a_gradient(tiny_llama):
    """bitsandbytes repacks 4-bit weights on the first no-grad forward on AVX512-BF16 CPUs, after which
    LoRA gradients silently vanish. finetune.models.load_model turns that path off."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from finetune.models import load_model
    from finetune.recipe import ModelConfig, QuantizationConfig

    model = load_model(ModelConfig(name=str(tiny_llama)), QuantizationConfig(bits=4))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    torch.manual_seed(0)
    # init_lora_weights=False: B starts non-zero too, so every tensor (A included) has a gradient.
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.eval()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, do_sample=False)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    bad = [n for n, p in lora.items() if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum()]
    assert lora and bad == []


def test_a_4bit_model_no_longer_maps_its_weights_file(tiny_llama, monkeypatch):
    """The weights left unquantized are copied out of the safetensors file, so it is unmapped (its pages held every
    weight, quantized ones too); the embeddings stay tied to the head, and the model computes what it did."""
    import gc

    from finetune import models
    from finetune.recipe import ModelConfig, QuantizationConfig

    def load():
        model = models.load_model(ModelConfig(name=str(tiny_llama)), QuantizationConfig(bits=4))
        gc.collect()
        mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(tiny_llama) in line]
        with torch.no_grad():
            return model, mapped, model(input_ids=torch.tensor([[5, 6, 7, 8, 9, 10]])).logits

    model, mapped, logits = load()
    assert mapped == [] and model.lm_head.weight is model.model.embed_tokens.weight
    monkeypatch.setattr(models, "_own_unquantized_weights", lambda model: None)
    _, mapped_before, logits_before = load()
    assert mapped_before  # what the copy removes
    assert torch.equal(logits, logits_before)


def test_interrupt_saves_a_checkpoint_and_resume_continues_from_it(tmp_path, tiny_llama, chat_file):
    from transformers import TrainerCallback

    class SigtermAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, train={"max_steps": 5})
    with pytest.raises(FinetuneError, match="interrupted by SIGTERM at step 3; a checkpoint"):
        sft.main(recipe, callbacks=[SigtermAtStep2()])
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    checkpoint = run_dir / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    # Without resume, the existing run directory is refused.
    with pytest.raises(FinetuneError, match="already exists; pick another output_dir, resume it"):
        sft.main(tiny_recipe(tmp_path, tiny_llama, chat_file, train={"max_steps": 5}))

    snap = Snapshot()
    resumed = tiny_recipe(tmp_path, tiny_llama, chat_file, train={"max_steps": 5, "resume": True})
    sft.main(resumed, callbacks=[snap])
    saved = load_file(checkpoint / "adapter_model.safetensors")
    at_start = {k.replace(".default", ""): v for k, v in snap.trainable.items()}
    for key, value in saved.items():
        match = [v for k, v in at_start.items() if k.endswith(key.removeprefix("base_model.model."))]
        assert match and torch.equal(match[0].float(), value.float()), key
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]  # the resumed run went on at step 4
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["summary"]["steps"] == 5


def test_run_json_records_what_later_commands_need(tmp_path, tiny_llama, chat_file):
    run_dir = sft.main(tiny_recipe(tmp_path, tiny_llama, chat_file))
    run = json.loads((run_dir / "run.json").read_text())
    assert run["base_model"]["path"] == str(tiny_llama)
    assert run["world_size"] == 1 and run["processes"][0]["steps"] == 3
    assert run["versions"]["trl"] and run["versions"]["torch"]
    assert list(run["dataset_hashes"].values())[0] and len(list(run["dataset_hashes"].values())[0]) == 64
    assert run["chat_template"]["family"] == "smollm2"
    assert "git_commit" in run
    # The memory estimate made before training, its parts, and the measured peak beside it.
    estimate = run["memory_estimate_mib"]
    parts = ("now", "gradients_and_optimizer", "activations", "logits")
    assert estimate["total"] == pytest.approx(sum(estimate[k] for k in parts), abs=0.5)
    assert estimate["tokens_per_step"] == 2 * 128  # batch 2, packed rows of max_length 128
    assert run["summary"]["peak_memory_estimate_mib"] == estimate["total"] and run["summary"]["peak_memory_mib"] > 0
    assert run["recipe"]["train"]["fast_path"] is True


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_memory_estimates_now_without_what_the_allocator_kept_after_frees():
    """Memory freed inside glibc's heap stays resident until trimmed; the estimate's "now" is measured after
    `release_freed` hands it back, so the step that reuses it is not counted twice (QLoRA loading frees ~250 MB)."""
    from finetune import memory

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    keep, drop = [], []
    for i in range(3000):  # 64 KiB each, below glibc's mmap threshold: in the heap, every other one kept
        (keep if i % 2 else drop).append(torch.ones(16 * 1024))
    del drop
    held = rss()
    now = memory.current_mib()
    assert now < held - 50, (held, now)  # ~94 MiB freed
    assert len(keep) == 1500


def test_memory_estimate_counts_activation_checkpointing_by_layer(tmp_path, tiny_llama, chat_file):
    """With train.activation_checkpointing the estimate's activations are the checkpointed layers' (their saved
    input and share of recomputation) and, with every_n_layers, full ones for the layers left out."""
    from finetune import memory
    from finetune.stages import runner

    def activations(**train):
        recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, data={"packing": True}, train=train)
        b = runner.build(recipe)
        return memory.estimate(b.trainer, recipe, b.prepared)["activations"]

    tokens, hidden = 2 * 128, 64  # two packed rows of 128; the tiny model: 2 layers of 64
    unit = tokens * hidden / 2**20
    full, recomputed = memory.BYTES_PER_ACTIVATION["fast"], memory.BYTES_PER_CHECKPOINTED_LAYER
    assert activations() == pytest.approx(unit * 2 * full, abs=0.05)
    assert activations(activation_checkpointing=True) == pytest.approx(unit * 2 * recomputed, abs=0.05)
    assert activations(activation_checkpointing=True, activation_checkpointing_kwargs={"every_n_layers": 2}) \
        == pytest.approx(unit * (recomputed + full), abs=0.05)  # layer 0 checkpointed, layer 1 keeps its own


def test_memory_estimate_on_cuda_counts_hidden_and_mlp_units(tmp_path, tiny_llama, chat_file, monkeypatch):
    """On CUDA (stood in for) the fast step's activations are counted per hidden unit and per MLP unit of each layer
    (the GPU runs' fit, less the norms' and SwiGLU's outputs that plain LoRA layers recompute there: not with LoRA
    dropout), with the fit's margin; a checkpointed layer keeps its bf16 input and one layer
    recomputes at a time; an fp32 model's activations count twice the bytes. The CPU keeps its own constants."""
    from finetune import memory
    from finetune.stages import runner

    def activations(cuda=True, dtype="bf16", adapter=None, **train):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, model={"name": str(tiny_llama), "dtype": dtype},
                             data={"packing": True}, train=train, **({"adapter": adapter} if adapter else {}))
        b = runner.build(recipe)
        b.trainer.args.use_cpu = not cuda
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 100 * 2**20)
        return memory.estimate(b.trainer, recipe, b.prepared)["activations"], b.trainer.model.config

    full, config = activations()
    tokens, hidden, mlp, layers = 2 * 128, config.hidden_size, config.intermediate_size, config.num_hidden_layers
    layer = memory.CUDA_BYTES_PER_HIDDEN * hidden + memory.CUDA_BYTES_PER_MLP_UNIT * mlp \
        - memory.CUDA_RECOMPUTED_PER_HIDDEN * hidden - memory.CUDA_RECOMPUTED_PER_MLP_UNIT * mlp  # a LoRA recipe
    assert full == pytest.approx(tokens * layers * layer * memory.CUDA_MARGIN / 2**20, abs=0.05)
    checkpointed, _ = activations(activation_checkpointing=True)
    kept = layers * memory.CUDA_BYTES_PER_CHECKPOINTED_HIDDEN * hidden + layer
    assert checkpointed == pytest.approx(tokens * kept * memory.CUDA_MARGIN / 2**20, abs=0.05) and checkpointed < full
    assert activations(dtype="fp32")[0] == pytest.approx(2 * tokens * layers * layer * memory.CUDA_MARGIN / 2**20,
                                                         abs=0.05)
    # LoRA with dropout: its layers take peft's forward, which keeps their inputs: nothing subtracted
    dropout, _ = activations(adapter={"r": 4, "alpha": 8, "dropout": 0.05})
    assert dropout == pytest.approx(tokens * layers * (memory.CUDA_BYTES_PER_HIDDEN * hidden
                                                       + memory.CUDA_BYTES_PER_MLP_UNIT * mlp)
                                    * memory.CUDA_MARGIN / 2**20, abs=0.05) and dropout > full
    cpu, _ = activations(cuda=False)  # a CPU run on a machine with a GPU
    assert cpu == pytest.approx(tokens * hidden * layers * memory.BYTES_PER_ACTIVATION["fast"] / 2**20, abs=0.05)


def test_folded_accumulation_trains_what_accumulation_trains(tmp_path, tiny_llama, chat_file):
    """What `fit_cuda_batch`'s fold on CUDA rests on: 2 packed rows x 2 accumulated forwards and 4 rows x 1 forward
    take the same rows each optimizer step and make the same update (the fast step, fp32: the adapter after 3 steps
    equal to 1e-5 relative; gradients summed in another order)."""
    from finetune import memory
    from finetune.stages import runner

    adapters = []
    for fold in (False, True):
        recipe = tiny_recipe(tmp_path / f"fold-{fold}", tiny_llama, chat_file, model={"name": str(tiny_llama),
                             "dtype": "fp32"}, data={"packing": True}, train={"gradient_accumulation_steps": 2})
        b = runner.build(recipe)
        if fold:
            memory._set_batch(b.trainer, 4, 4, 1)
        b.trainer.train()
        assert b.trainer.state.global_step == 3
        adapters.append({n: p.detach().clone() for n, p in b.trainer.model.named_parameters() if p.requires_grad})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for name, weight in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], weight, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(w, adapters[0][n]) for n, w in adapters[1].items())  # not the very same computation


def test_overwrite_replaces_only_a_run_and_only_once_the_new_one_has_loaded(tmp_path, tiny_llama, chat_file):
    not_a_run = tmp_path / "run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("keep me")
    with pytest.raises(FinetuneError, match="is not a run directory .*overwrite=true only replaces a previous run"):
        sft.main(tiny_recipe(tmp_path, tiny_llama, chat_file, overwrite=True))
    assert (not_a_run / "notes.txt").read_text() == "keep me"
    (not_a_run / "notes.txt").unlink()
    sft.main(tiny_recipe(tmp_path, tiny_llama, chat_file))
    before = (not_a_run / "run.json").read_text()
    # A recipe that fails while loading (its data is missing) leaves the previous run as it was.
    with pytest.raises(FinetuneError, match="not found"):
        sft.main(tiny_recipe(tmp_path, tiny_llama, tmp_path / "missing.jsonl", overwrite=True))
    assert (not_a_run / "run.json").read_text() == before


def test_validate_writes_nothing_to_output_dir(tmp_path, tiny_llama, chat_file):
    from finetune.validate import main as validate

    validate(tiny_recipe(tmp_path, tiny_llama, chat_file))
    assert not (tmp_path / "run").exists()


def test_on_cuda_packed_sft_fills_the_token_budget_the_memory_estimate_allows(tmp_path, tiny_llama, chat_file,
                                                                                monkeypatch):
    """train.gpu_tokens_per_step on a CUDA machine (its free memory and allocation stood in for: the suite has no
    GPU): the recipe's batch of 2 rows is raised to the budget's rows, or to what the estimate fits, never below
    the recipe's; the CPU and gpu_tokens_per_step: null keep it. The trainer's dataloader follows."""
    from finetune import memory
    from finetune.stages import runner

    def built(tokens_per_step, free_gib, accumulation=1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # built as on the CPU, then fitted
        recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, data={"packing": True},
                             train={"gpu_tokens_per_step": tokens_per_step,
                                    "gradient_accumulation_steps": accumulation})
        b = runner.build(recipe)
        b.trainer.args.use_cpu = False  # as TrainingArguments say on a CUDA machine
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free_gib * 2**30, 80 * 2**30))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 100 * 2**20)
        message = memory.fit_cuda_batch(b.trainer, recipe, b.prepared, recipe.train.gpu_tokens_per_step)
        per_row = memory.estimate(b.trainer, recipe, b.prepared)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        return b.trainer, message, per_row

    trainer, message, _ = built(1024, 80)  # max_length 128: 8 rows
    assert trainer.args.per_device_train_batch_size == 8 and trainer._train_batch_size == 8
    assert message.startswith("CUDA: per-device batch 2 -> 8, 1,024 tokens per optimizer step (train.gpu_tokens_per_")
    assert "; the next batches collated by 2 DataLoader workers while a step runs; " in message
    assert (trainer.args.dataloader_num_workers, trainer.args.dataloader_persistent_workers) == (2, True)
    assert next(iter(trainer.get_train_dataloader()))["input_ids"].numel() > 2 * 128  # more than the recipe's 2 rows
    trainer, message, estimate = built(10**6, 80)  # the budget beyond memory: as many rows as the estimate fits
    rows = trainer.args.per_device_train_batch_size
    assert "memory estimate fits in 85% of 80.0 GiB free" in message and 8 < rows < 10**6 // 128
    assert estimate["tokens_per_step"] == rows * 128 and estimate["activations"] <= 0.85 * 80 * 1024
    assert estimate["activations"] * (rows + 2) / rows > 0.85 * 80 * 1024 - estimate["logits"] * (rows + 2) / 2
    assert trainer.args.per_device_eval_batch_size == rows  # evaluation (no gradients) at the fitted rows too
    # The budget is per optimizer step: with accumulation 2, 4 rows twice; they fit in one forward, so folded: 8
    # rows once, the same rows a step.
    trainer, message, _ = built(1024, 80, accumulation=2)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (8, 1)
    assert message.startswith("CUDA: per-device batch 2 -> 8, gradient accumulation 2 -> 1 (the same rows a step, "
                              "one forward), 1,024 tokens per optimizer step (train.gpu_tokens_per_step;")
    _, _, at_two = built(None, 80)  # the estimate at the recipe's 2 rows, as fit_cuda_batch takes it
    per_row = (at_two["activations"] + at_two["logits"]) / 2
    tight = (5.5 * per_row + at_two["gradients_and_optimizer"]) / 0.85 / 1024  # memory for 5 rows: 4, not folded
    trainer, message, _ = built(1024, tight, accumulation=2)
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (4, 2)
    # A resume of a folded run keeps it folded (8 rows are more than 1,024 tokens with accumulation 2), even where
    # the memory would not fold it now; an unfolded one stays unfolded.
    folded_checkpoint = tmp_path / "checkpoint-5"
    folded_checkpoint.mkdir()
    (folded_checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5, "train_batch_size": 8}))
    resumed2 = tiny_recipe(tmp_path, tiny_llama, chat_file, data={"packing": True},
                           train={"gpu_tokens_per_step": 1024, "gradient_accumulation_steps": 2})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.pin_resumed_batch(trainer, resumed2, folded_checkpoint) \
        == "CUDA: per-device batch 4 -> 8, gradient accumulation 2 -> 1, the batch checkpoint-5 was trained with; " \
        "more than the 5 the memory estimate fits in the GPU's free memory now: free GPU memory if it runs out"
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (8, 1)
    (folded_checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 5, "train_batch_size": 4}))
    assert memory.pin_resumed_batch(trainer, resumed2, folded_checkpoint) \
        == "CUDA: per-device batch 8 -> 4, gradient accumulation 1 -> 2, the batch checkpoint-5 was trained with"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer, message, _ = built(1024, 80)
    trainer.is_deepspeed_enabled = True  # DeepSpeed's configuration took the batch at the trainer's making
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.fit_cuda_batch(trainer, resumed2, None, 1024) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # A resume keeps the batch its checkpoint was trained with (trainer_state.json), not what free memory fits now.
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3, "train_batch_size": 4}))
    trainer, message, _ = built(1024, 80)
    resumed = tiny_recipe(tmp_path, tiny_llama, chat_file, data={"packing": True}, train={"gpu_tokens_per_step": 1024})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memory.pin_resumed_batch(trainer, resumed, checkpoint) \
        == "CUDA: per-device batch 8 -> 4, the batch checkpoint-3 was trained with"
    assert trainer.args.per_device_train_batch_size == 4 and trainer._train_batch_size == 4
    assert trainer.args.per_device_eval_batch_size == 4  # the rows evaluation had then (the recipe's 2, or the batch)
    assert memory.pin_resumed_batch(trainer, resumed, checkpoint) is None  # already that batch
    trainer.finetune_fitting_rows = 3  # the GPU has less free memory now than the checkpoint's batch needs: said
    trainer.args.per_device_train_batch_size = 8
    assert memory.pin_resumed_batch(trainer, resumed, checkpoint).endswith(
        "trained with; more than the 3 the memory estimate fits in the GPU's free memory now: free GPU memory if it "
        "runs out")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3, "train_batch_size": 1}))
    assert memory.pin_resumed_batch(trainer, resumed, checkpoint) is None  # never below the recipe's 2 rows
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    assert memory.pin_resumed_batch(trainer, resumed, checkpoint).startswith(
        "CUDA: checkpoint-3 records no batch; the batch fitted now (4 rows) may not be the one it was trained with")
    trainer.args.use_cpu = True  # the CPU keeps the recipe's batch, resumed or not
    trainer.args.per_device_train_batch_size = 2
    assert memory.pin_resumed_batch(trainer, resumed, checkpoint) is None
    assert trainer.args.per_device_train_batch_size == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer, message, _ = built(None, 80)
    assert message is None and trainer.args.per_device_train_batch_size == 2
    trainer, message, _ = built(1024, 0.001)  # no room: the recipe's batch stays (collated by the workers still)
    assert message == ("CUDA: the next batches collated by 2 DataLoader workers while a step runs "
                       "(train.gpu_tokens_per_step: null keeps the recipe's loader)")
    assert trainer.args.per_device_train_batch_size == 2 and trainer.args.dataloader_num_workers == 2
    recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, data={"packing": True})
    b = runner.build(recipe)  # a CPU run (use_cpu) on a machine with a GPU keeps its batch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert b.trainer.args.use_cpu and memory.fit_cuda_batch(b.trainer, recipe, b.prepared, 1024) is None
