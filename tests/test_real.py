"""A few real steps of the embedded SmolLM2-135M-Instruct: the README's commands, for truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, smol_path):
    """Ten QLoRA SFT steps: the demo's loss has fallen from 0.36 to ~0.05 by then, so the model has learned to
    answer and stop. Shared by the SFT checks and the stages that continue it."""
    tmp_path = tmp_path_factory.mktemp("real-sft")
    run_dir = tmp_path / "run"
    code = main(["train", str(REPO / "recipes/smollm2-135m/sft_qlora.yaml"), "train.max_steps=10",
                 f"output_dir={run_dir}", f"data.cache_dir={tmp_path / 'cache'}"])
    return code, run_dir


def test_qlora_sft_on_the_embedded_model(sft_run):
    code, run_dir = sft_run
    assert code == 0
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["summary"]["steps"] == 10
    assert run["recipe"]["quantization"]["bits"] == 4
    assert run["data"]["train_rows"] == 400 and run["data"]["eval_rows"] == 60
    # The held-out loss was measured before and after, on the real model.
    assert 0 < run["summary"]["eval_loss_after"] < run["summary"]["eval_loss_before"]
    tokenizer_config = json.loads((run_dir / "adapter" / "tokenizer_config.json").read_text())
    chat_template = (run_dir / "adapter" / "chat_template.jinja")
    template = chat_template.read_text() if chat_template.is_file() else tokenizer_config["chat_template"]
    assert "{% generation %}" not in template  # the run keeps the model's inference template

    # Export, then load the folder in a fresh process that imports only torch and transformers, and chat.
    # After 10 steps many entries of the LoRA update are still below half a bf16 unit of their weight, so a
    # bf16 export rounds them away and the gate refuses it (KL 2e-3); the demo's 40 steps export in bf16.
    assert main(["export", str(run_dir)]) == 2
    assert not (run_dir / "export").exists()
    assert main(["export", str(run_dir), "--dtype", "fp32"]) == 0
    report = json.loads((run_dir / "export" / "export_report.json").read_text())
    assert report["gate"] == "passed" and report["dtype"] == "float32"
    assert report["stop_check"]["stop_rate"] >= 0.9
    script = f"""
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(run_dir / "export")!r})
tok = transformers.AutoTokenizer.from_pretrained({str(run_dir / "export")!r})
msgs = [{{"role": "user", "content": "Extract name, age and city as JSON: Ana Silva, 31, lives in Porto."}}]
inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
assert not [m for m in sys.modules if m.split(".")[0] in ("finetune", "peft", "trl")], "imported more than transformers"
print("STOPPED" if new[-1] in model.generation_config.eos_token_id else "RAN ON",
      repr(tok.decode(new, skip_special_tokens=True)))
"""
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert fresh.stdout.startswith("STOPPED"), fresh.stdout


def test_dpo_after_sft_raises_the_held_out_margin(sft_run, tmp_path):
    """The shipped DPO recipe, continuing the 10-step SFT run for 6 steps: the SFT model is the reference, so the
    first step's loss is ln 2; the held-out log-probability margin of chosen over rejected answers rises."""
    _, sft_dir = sft_run
    run_dir = tmp_path / "dpo"
    assert main(["train", str(REPO / "recipes/smollm2-135m/dpo_qlora.yaml"), f"model.init_from={sft_dir}",
                 "train.max_steps=6", f"output_dir={run_dir}"]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - 0.693147) < 1e-3 and abs(first["rewards/margins"]) < 1e-3, first
    before, after = run["summary"]["heldout_preference_before"], run["summary"]["heldout_preference_after"]
    assert after["mean_margin"] > before["mean_margin"], (before, after)
    assert run["summary"]["eval_loss_after"] < 0.693147 < run["summary"]["eval_loss_after"] + 0.5  # below ln 2
    assert set(after["per_type"]) == {"distractor_age", "key_order", "pretty", "prose"}
    assert after["pairs"] == 80 and [c["stage"] for c in run["chain"]] == ["sft", "dpo"]


def test_grpo_after_sft_samples_scores_and_updates_the_adapter(sft_run, tmp_path):
    _, sft_dir = sft_run
    run_dir = tmp_path / "grpo"
    assert main(["train", str(REPO / "recipes/smollm2-135m/grpo_lora.yaml"), f"model.init_from={sft_dir}",
                 "train.max_steps=2", "data.eval_datasets=[]", f"output_dir={run_dir}"]) == 0
    run = json.loads((run_dir / "run.json").read_text())
    sft = json.loads((sft_dir / "run.json").read_text())
    assert run["adapter_sha256"] != sft["adapter_sha256"]
    logged = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 16 and all(r["rewards"]["exact_match"] in (0.0, 1.0) for r in logged)  # 2 x 8 answers
    # The SFT model already answers many prompts exactly: exact match is a reward with signal from step 1.
    assert 0 < run["summary"]["train_reward_first"] <= 1


def test_two_process_ddp_on_cpu_splits_the_batches(tmp_path, smol_path):
    """The README's multi-process command: two gloo processes, one run directory, half the batches each."""
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu_ddp.yaml"), "-m", "finetune", "train",
           str(REPO / "recipes/smollm2-135m/sft_lora.yaml"), "train.max_steps=2", f"output_dir={run_dir}",
           "data.eval_datasets=[]", f"data.cache_dir={tmp_path / 'cache'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["world_size"] == 2 and run["status"] == "completed"
    ranks = run["processes"]
    assert [p["rank"] for p in ranks] == [0, 1]
    for p in ranks:
        assert p["steps"] == 2
        assert p["batches_per_epoch"] * 2 == p["batches_per_epoch_all"]
    assert sorted(x.name for x in run_dir.iterdir()) == ["adapter", "checkpoints", "loss_curve.png", "metrics.jsonl",
                                                          "run.json"]
