"""What survives what: each test injects one fault into a tiny run and checks what the toolkit does.

SIGKILL in the middle of a checkpoint save and the resume that follows (adapter and losses equal to an
uninterrupted run's), checkpoints that are visible only when complete, a full disk during a save, a resume of an
earlier checkpoint, a resume with a changed recipe or data, NaN losses and overflowing updates. The README's
"What survives what" table points here.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_jsonl
from safetensors.torch import load_file

from finetune.errors import FinetuneError
from finetune.recipe import recipe_from_dict
from finetune.stages import runner

WORDS = "red green blue cat dog bird one two three sun moon star river hill road tree".split()


def _chats(n: int) -> list[dict]:
    """Chats of varied length, so that packing and shuffling both matter."""
    return [{"messages": [{"role": "user", "content": f"List {i % 7 + 1} words ({i})."},
                          {"role": "assistant", "content": " ".join(WORDS[(i + j) % len(WORDS)]
                                                                    for j in range(i % 7 + 1))}]}
            for i in range(n)]


def _pairs(n: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Request {i}: will you help with {WORDS[i % len(WORDS)]}?"}],
             "chosen": [{"role": "assistant", "content": "Yes, gladly."}],
             "rejected": [{"role": "assistant", "content": "No way." + " no" * (i % 3)}]} for i in range(n)]


def _prompts(n: int) -> list[dict]:
    """Prompts whose reference answer is 30 characters: the length reward then pays some sampled answers more
    than others, so that GRPO has advantages to learn from."""
    return [{"messages": [{"role": "user", "content": f"Say a word ({i})."},
                          {"role": "assistant", "content": "x" * 30}]} for i in range(n)]


# Per stage: the rows and the recipe's train keys. fp32 throughout, a shuffled multi-step epoch, gradient
# accumulation 4 (SFT: packed rows and LoRA dropout 0.1; DPO and GRPO switch dropout off, as TRL does by default).
# GRPO: one generation round per optimizer step (steps_per_generation = gradient accumulation, num_iterations 1),
# since buffered generations are not part of a checkpoint.
STAGES = {
    "sft": (_chats(240), {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}, {"dropout": 0.1}),
    "dpo": (_pairs(40), {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 4, "max_steps": 4}, {}),
    "grpo": (_prompts(32), {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 4,
                            "steps_per_generation": 2, "num_iterations": 1, "num_generations": 4,
                            "max_completion_length": 6, "beta": 0.04, "temperature": 1.0}, {}),
}


def _raw(tmp_path: Path, model_dir, stage: str, out: str = "run", **train) -> dict:
    rows, stage_train, adapter = STAGES[stage]
    data = write_jsonl(tmp_path / f"{stage}.jsonl", rows)
    raw = {"model": {"name": str(model_dir), "dtype": "fp32"},
           "adapter": {"r": 4, "alpha": 8, **adapter},
           "data": {"datasets": [str(data)], "max_length": 64, "cache_dir": str(tmp_path / "cache")},
           "train": {"stage": stage, "max_steps": 6, "learning_rate": 1e-3, "save_steps": 2, "logging_steps": 1,
                     "save_total_limit": 5, "warmup_steps": 0, **stage_train, **train},
           "output_dir": str(tmp_path / out)}
    if stage == "grpo":
        raw["rewards"] = [{"function": "length"}]
    return raw


def _recipe(raw: dict, **train):
    return recipe_from_dict({**raw, "train": {**raw["train"], **train}}, "recipe.yaml")


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _train_script(tmp_path: Path, name: str, raw: dict, kill_step: int | None = None) -> Path:
    """A script that trains the recipe; with kill_step, the process kills itself (SIGKILL) in the middle of saving
    checkpoint-<kill_step>: after its optimizer state is written, before its scheduler, RNG and trainer state."""
    recipe = tmp_path / f"{name}.json"
    recipe.write_text(json.dumps(raw))
    kill = f"""
real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if str(f).endswith("checkpoint-{kill_step}/optimizer.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
""" if kill_step else ""
    script = tmp_path / f"{name}.py"
    script.write_text(f"""
import json, os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import torch
from finetune.recipe import recipe_from_dict
from finetune.stages import runner
{kill}
runner.train(recipe_from_dict(json.load(open({str(recipe)!r})), "recipe.yaml"))
""")
    return script


def _start_killed_run(tmp_path: Path, raw: dict, step: int) -> subprocess.Popen:
    script = _train_script(tmp_path, "killed", raw, step)
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_sigkill_mid_save_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_llama, stage):
    from finetune.cli import main as cli

    killed_raw = _raw(tmp_path, tiny_llama, stage, out="killed")
    killed = _start_killed_run(tmp_path, killed_raw, step=4)  # runs while the uninterrupted run trains here
    straight = runner.train(_recipe(_raw(tmp_path, tiny_llama, stage, out="straight")))
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]

    run_dir = tmp_path / "killed"
    names = _dirs(run_dir / "checkpoints")
    assert names[1] == "checkpoint-2" and len(names) == 2 and names[0].startswith(".staging-checkpoint-4-"), names
    # run.json still says running; every reader sees that its process is gone.
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"
    from finetune.rundir import read_run

    assert read_run(run_dir)["status"] == "interrupted"
    assert cli(["export", str(run_dir)]) == 2  # export refuses; compare and chat name the status
    from finetune.generate import load_for_inference

    with pytest.raises(FinetuneError, match=r"has no adapter/ or model/ folder \(run status: interrupted\)"):
        load_for_inference(str(run_dir))

    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a line cut short by the kill
    resumed = runner.train(_recipe(killed_raw, resume=True))
    steps = killed_raw["train"]["max_steps"]
    assert _dirs(resumed / "checkpoints") == [f"checkpoint-{s}" for s in range(2, steps + 1, 2)]
    assert json.loads((resumed / "run.json").read_text())["resumed_from"] == "checkpoint-2"
    assert _steps_logged(resumed) == list(range(1, steps + 1))  # each step once: 3 and 4 were logged before the kill
    after = {s: v for s, v in _losses(resumed).items() if s > 2}
    assert after == {s: v for s, v in _losses(straight).items() if s > 2}
    a, b = _adapter(straight), _adapter(resumed)
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert any(not torch.equal(a[k], load_file(run_dir / "checkpoints/checkpoint-2/adapter_model.safetensors")[k])
               for k in a)  # the adapter trained on after the checkpoint


def _launch(tmp_path: Path, name: str, raw: dict, port: int, kill_step: int | None = None) -> subprocess.Popen:
    """`accelerate launch` with the 2-process CPU config; kill_step: rank 0 kills itself mid-save (as above)."""
    script = _train_script(tmp_path, name, raw, kill_step)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "recipes/accelerate/cpu_ddp.yaml"), "--main_process_port", str(port), str(script)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_sigkill_mid_save_then_resume_under_two_processes(tmp_path, tiny_llama):
    """The same under the 2-process CPU accelerate config: each rank's RNG state is in every published checkpoint,
    and the resumed run ends where the uninterrupted one does."""
    straight_raw = _raw(tmp_path, tiny_llama, "sft", out="straight", max_steps=4, gradient_accumulation_steps=2)
    killed_raw = {**straight_raw, "output_dir": str(tmp_path / "killed")}
    runs = [_launch(tmp_path, "straight", straight_raw, 29541), _launch(tmp_path, "killed", killed_raw, 29542, 4)]
    (out, err), (_, killed_err) = (p.communicate(timeout=600) for p in runs)
    assert runs[0].returncode == 0, err[-3000:]
    assert runs[1].returncode != 0
    run_dir = tmp_path / "killed"
    assert _dirs(run_dir / "checkpoints")[1:] == ["checkpoint-2"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= set(
        _files(run_dir / "checkpoints" / "checkpoint-2"))
    resumed = _launch(tmp_path, "resumed", {**killed_raw, "train": {**killed_raw["train"], "resume": True}}, 29543)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    straight = tmp_path / "straight"
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2
    assert _steps_logged(run_dir) == [1, 2, 3, 4]
    assert {s: v for s, v in _losses(run_dir).items() if s > 2} == {s: v for s, v in _losses(straight).items() if s > 2}
    a, b = _adapter(straight), _adapter(run_dir)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def _files(folder: Path) -> frozenset:
    return frozenset(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_checkpoint_is_visible_only_when_complete_at_every_file_write(tmp_path, tiny_llama):
    """Equivalent to a kill between any two files of any save: at every file opened for writing, every rename and
    every folder removal during the run, each visible checkpoint-N is complete, and so is adapter/ once there."""
    raw = _raw(tmp_path, tiny_llama, "sft", max_steps=4, save_steps=1, save_total_limit=2)
    run_dir = Path(raw["output_dir"])
    seen: list[dict] = []
    state = {"active": False, "busy": False}

    def look():
        root = run_dir / "checkpoints"
        view = {}
        if root.is_dir():
            view = {p.name: _files(p) for p in root.iterdir() if p.name.startswith("checkpoint-")}
        if (run_dir / "adapter").is_dir():
            view["adapter"] = _files(run_dir / "adapter")
        seen.append(view)

    def hook(event, args):
        if not state["active"] or state["busy"]:
            return
        writing = event == "open" and args[1] is not None and any(c in str(args[1]) for c in "wax+")
        if writing or event in ("os.rename", "os.replace", "shutil.rmtree", "os.remove"):
            state["busy"] = True
            try:
                look()
            finally:
                state["busy"] = False

    sys.addaudithook(hook)
    state["active"] = True
    try:
        runner.train(_recipe(raw))
    finally:
        state["active"] = False
    complete = _files(run_dir / "checkpoints" / "checkpoint-4")
    adapter = _files(run_dir / "adapter")
    assert "training_args.bin" not in complete and "trainer_state.json" in complete
    assert len(seen) > 50  # the hook saw the saves' files
    published = set()
    for view in seen:
        for name, files in view.items():
            assert files == (adapter if name == "adapter" else complete), (name, sorted(files))
            published.add(name)
        if published - {"adapter"}:
            assert set(view) - {"adapter"}, "a moment with no complete checkpoint after the first was published"
    assert published == {"checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4", "adapter"}
    assert _dirs(run_dir / "checkpoints") == ["checkpoint-3", "checkpoint-4"]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_llama, monkeypatch):
    raw = _raw(tmp_path, tiny_llama, "sft", max_steps=4)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("checkpoint-4/optimizer.pt"):
            Path(f).write_bytes(b"\0" * 100)  # a part written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(FinetuneError, match=r"saving checkpoint-4 .* failed \(OSError: \[Errno 28\] No space left on "
                                            r"device.*MiB free.*checkpoint-2 is intact and is what train.resume=true "
                                            r"continues from"):
        runner.train(_recipe(raw))
    run_dir = Path(raw["output_dir"])
    assert _dirs(run_dir / "checkpoints") == ["checkpoint-2"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and "No space left on device" in run["error"]
    assert not (run_dir / "adapter").exists()

    # The final adapter save hits the full disk: no adapter/ (nor a part of it) appears.
    monkeypatch.setattr(torch, "save", real_save)
    import safetensors.torch

    def full_disk_st(tensors, path, *args, **kwargs):
        if ".adapter.partial-" not in str(path):
            return safetensors.torch.save_file(tensors, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import peft.peft_model  # peft writes adapters with safetensors' save_file, imported as safe_save_file

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk_st)
    with pytest.raises(FinetuneError, match=r"saving .*adapter failed \(\[Errno 28\] No space left on device\); "
                                            r"nothing of it was published, and the last checkpoint, "
                                            r"checkpoints/checkpoint-4, is intact"):
        runner.train(_recipe(raw, resume=True))
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob(".adapter*"))
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    monkeypatch.setattr(peft.peft_model, "safe_save_file", safetensors.torch.save_file)
    # The training had ended at checkpoint-4: the resume saves its weights and takes no further step.
    runner.train(_recipe(raw, resume=True))
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["summary"]["steps"] == 4
    last = load_file(run_dir / "checkpoints/checkpoint-4/adapter_model.safetensors")
    assert all(torch.equal(last[k], v) for k, v in _adapter(run_dir).items())


def test_resuming_an_earlier_checkpoint_sets_later_ones_aside(tmp_path, tiny_llama):
    raw = _raw(tmp_path, tiny_llama, "sft")
    run_dir = runner.train(_recipe(raw))
    first = _losses(run_dir)
    runner.train(_recipe(raw, resume=2))
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    aside = [p for p in root.iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert _steps_logged(run_dir) == [1, 2, 3, 4, 5, 6]
    assert _losses(run_dir) == first  # the same steps again, the same losses
    # A path works too; a step that is not there is refused with the ones that are.
    runner.train(_recipe(raw, resume=str(root / "checkpoint-4")))
    with pytest.raises(FinetuneError, match="train.resume = 3: .* has no checkpoint-3; it has checkpoint-2, "
                                            "checkpoint-4, checkpoint-6"):
        runner.train(_recipe(raw, resume=3))


def test_resume_with_a_changed_recipe_data_or_library_is_refused_with_the_differences(tmp_path, tiny_llama):
    raw = _raw(tmp_path, tiny_llama, "sft", max_steps=2)
    run_dir = runner.train(_recipe(raw))
    with pytest.raises(FinetuneError, match=r"train.resume: .* was trained with something else: "
                                            r"train.learning_rate 0.001 -> 0.002.*train.resume_changes=true"):
        runner.train(_recipe(raw, resume=True, learning_rate=2e-3))
    data = Path(raw["data"]["datasets"][0])
    data.write_text(data.read_text() + json.dumps(_chats(1)[0]) + "\n")
    run = json.loads((run_dir / "run.json").read_text())
    run["versions"]["torch"] = "2.0.0"
    (run_dir / "run.json").write_text(json.dumps(run))
    with pytest.raises(FinetuneError, match=r"data .*sft.jsonl sha256 \w+ -> \w+; torch 2.0.0 -> 2.13"):
        runner.train(_recipe(raw, resume=True))
    runner.train(_recipe(raw, resume=True, resume_changes=True, max_steps=3))
    assert json.loads((run_dir / "run.json").read_text())["summary"]["steps"] == 3


# ----------------------------------------------------------------------------- non-finite values


def _nan_from(step: int, until: int | None = None):
    """A callback that makes the model's output NaN during the given optimizer steps (a forward hook)."""
    from transformers import TrainerCallback

    class NaNAt(TrainerCallback):
        handle = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            bad = step <= state.global_step + 1 <= (until or 10**9)
            if bad and self.handle is None:
                self.handle = model.base_model.model.model.norm.register_forward_hook(
                    lambda module, inputs, output: output * float("nan"))
            elif not bad and self.handle is not None:
                self.handle.remove()
                self.handle = None

    return NaNAt()


def test_a_nan_loss_stops_the_run_before_its_update_and_nothing_non_finite_is_saved(tmp_path, tiny_llama):
    raw = _raw(tmp_path, tiny_llama, "sft", max_steps=5)
    with pytest.raises(FinetuneError, match=r"the loss was NaN/inf at step 3; the run stops before that step's "
                                            r"update.*train.on_nonfinite: skip"):
        runner.train(_recipe(raw), callbacks=[_nan_from(3)])
    run_dir = Path(raw["output_dir"])
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and "step 3" in run["error"]
    assert not (run_dir / "adapter").exists()
    saved = load_file(run_dir / "checkpoints/checkpoint-2/adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_skip_mode_skips_the_update_counts_it_and_stops_after_too_many(tmp_path, tiny_llama):
    from transformers import TrainerCallback

    class Around3(TrainerCallback):
        before = after = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step + 1 == 3:
                self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                self.after = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    raw = _raw(tmp_path, tiny_llama, "sft", max_steps=5, on_nonfinite="skip")
    watch = Around3()
    run_dir = runner.train(_recipe(raw), callbacks=[_nan_from(3, until=3), watch])
    assert all(torch.equal(watch.before[n], watch.after[n]) for n in watch.before)  # step 3 changed nothing
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["summary"]["nonfinite_skips"] == 1
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skips"] for r in logged if "loss" in r] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in _adapter(run_dir).values())

    raw = _raw(tmp_path, tiny_llama, "sft", out="run2", max_steps=5, on_nonfinite="skip", max_nonfinite_skips=1)
    with pytest.raises(FinetuneError, match=r"the loss was NaN/inf at step 3, and 1 steps were already skipped "
                                            r"\(train.max_nonfinite_skips = 1\)"):
        runner.train(_recipe(raw), callbacks=[_nan_from(2)])


def test_an_update_that_overflows_the_weights_stops_the_run(tmp_path, tiny_llama):
    from transformers import TrainerCallback

    class Overflow(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
            step = optimizer.step

            def overflowing_step(*a, **k):
                out = step(*a, **k)
                if state.global_step + 1 == 2:
                    with torch.no_grad():
                        next(p for p in model.parameters() if p.requires_grad).mul_(float("inf"))
                return out

            optimizer.step = overflowing_step

    raw = _raw(tmp_path, tiny_llama, "sft", max_steps=3, save_steps=1)
    with pytest.raises(FinetuneError, match="step 2 made trained weights NaN/inf"):
        runner.train(_recipe(raw), callbacks=[Overflow()])
    run_dir = Path(raw["output_dir"])
    assert _dirs(run_dir / "checkpoints") == ["checkpoint-1"]


def test_leftover_staging_is_cleaned_but_a_live_processs_is_left_alone(tmp_path):
    import socket

    from finetune.checkpoints import clean_staging

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    root = tmp_path / "checkpoints"
    names = {"live": f".staging-checkpoint-4-{os.getpid()}@{host}", "dead": f".staging-checkpoint-6-{dead.pid}@{host}",
             "other host": f".staging-checkpoint-8-{dead.pid}@another-{host}", "pruned": ".deleting-checkpoint-2-1",
             "published": "checkpoint-2"}
    for name in names.values():
        (root / name).mkdir(parents=True)
        (root / name / "optimizer.pt").write_bytes(b"0")
    removed = clean_staging(root)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["pruned"]])
    assert _dirs(root) == sorted([names["live"], names["other host"], names["published"]])
