"""What a run shows while it trains: the console line, the live loss curve, and the trackers of train.report_to,
read back from what they wrote. Most tests share one tiny run (3 steps, evaluated at steps 2 and 3) reporting to
tensorboard and mlflow."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
from conftest import CONVERSATIONS, tiny_recipe, write_jsonl

from finetune.errors import FinetuneError
from finetune.rundir import RunCallback, read_metrics
from finetune.stages import sft

SECRET, WANDB_SECRET = "hf_TRACKERsecret123456", "wandb-key-tracker987654"


def _probe():
    """A callback that notes, at each log, whether loss_curve.png exists and when it was last written."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self):
            self.seen = []  # (step, mtime_ns or None), logs during training only
            self.training = False

        def on_train_begin(self, args, state, control, **kwargs):
            self.training = True

        def on_train_end(self, args, state, control, **kwargs):
            self.training = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training:
                png = self.run_dir / "loss_curve.png"
                self.seen.append((state.global_step, png.stat().st_mtime_ns if png.exists() else None))

    return Probe()


def _tracked_run(tmp, model_dir, report_to, **train):
    """A tiny SFT run with secrets in the environment and in run_name; returns (run_dir, stdout, stderr, probe)."""
    data = write_jsonl(tmp / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    held_out = write_jsonl(tmp / "held_out.jsonl", [{"messages": CONVERSATIONS[0]}])
    recipe = tiny_recipe(tmp, model_dir, data, data={"eval_datasets": [str(held_out)]},
                         train={"max_steps": 3, "report_to": report_to, "eval_strategy": "steps", "eval_steps": 2,
                                "run_name": f"run-{SECRET}", **train})
    probe = _probe()
    probe.run_dir = tmp / "run"
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setenv("HF_TOKEN", SECRET)
        mp.setenv("WANDB_API_KEY", WANDB_SECRET)
        for key in ("MLFLOW_TRACKING_URI", "TENSORBOARD_LOGGING_DIR", "MLFLOW_RUN_ID"):
            mp.delenv(key, raising=False)
        mp.setattr(RunCallback, "PLOT_EVERY_S", 0.0)  # redraw at every logging step
        mp.setattr(RunCallback, "PLOT_TIME_SHARE", 0.0)
        run_dir = sft.main(recipe, callbacks=[probe])
    return run_dir, out.getvalue(), err.getvalue(), probe


@pytest.fixture(scope="module")
def tracked(tiny_llama, tmp_path_factory):
    return _tracked_run(tmp_path_factory.mktemp("tracked"), tiny_llama, ["tensorboard", "mlflow"])


def _logged(run_dir, key):
    """(step, value) of every metrics.jsonl row holding `key`, in order."""
    return [(r["step"], r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r]


def test_console_shows_one_compact_line_per_logging_step_under_the_progress_bar(tracked):
    run_dir, out, err, _ = tracked
    losses = _logged(run_dir, "loss")
    assert [s for s, _ in losses] == [1, 2, 3]
    train_lines = [line for line in out.splitlines() if re.match(r"step \d+/3 \| loss ", line)]
    assert len(train_lines) == 3, out
    for (step, loss), line in zip(losses, train_lines):
        rate = r" \| [\d,]+ tok/s" if step > 1 else ""  # tokens/s from the first logged step to this one
        assert re.fullmatch(rf"step {step}/3 \| loss {loss:.4f} \| lr 1\.00e-02{rate} \| ETA \d+:\d\d", line), line
    # Evaluations during training (step 2, and the last step) print a line; the held-out figures before (step 0) and
    # after training do not.
    evals = _logged(run_dir, "eval_loss")
    assert [s for s, _ in evals] == [0, 2, 3, 3]
    assert [line for line in out.splitlines() if " | eval loss " in line] == \
        [f"step {s}/3 | eval loss {v:.4f}" for s, v in evals[1:3]]
    assert "'loss'" not in out and "{'" not in out  # no raw Trainer dicts
    assert re.search(r"3/3 \[", err), err[-500:]  # tqdm's bar is still drawn


def test_loss_curve_is_redrawn_while_training(tracked):
    run_dir, _, _, probe = tracked
    # At every logging step the curve exists, and it changed between the first and the last log of training.
    assert probe.seen and all(mtime is not None for _, mtime in probe.seen), probe.seen
    assert probe.seen[0][1] < probe.seen[-1][1]
    assert (run_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(run_dir.glob(".*tmp*"))  # written through a temp file, renamed into place


def test_redraws_are_rate_limited(tmp_path):
    from types import SimpleNamespace

    callback = RunCallback(tmp_path, is_main=True)
    state = SimpleNamespace(global_step=1, epoch=0.1)
    callback.next_plot = 0.0  # due now
    callback.on_log(None, state, None, logs={"loss": 2.0})
    first = (tmp_path / "loss_curve.png").stat().st_mtime_ns
    assert callback.next_plot >= callback.start_time + RunCallback.PLOT_EVERY_S
    state.global_step = 2
    callback.on_log(None, state, None, logs={"loss": 1.5})  # within PLOT_EVERY_S: not redrawn
    assert (tmp_path / "loss_curve.png").stat().st_mtime_ns == first


def test_tensorboard_holds_the_logged_losses(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked[0]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    train = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert train == [(s, pytest.approx(v, rel=1e-6)) for s, v in _logged(run_dir, "loss")]
    held_out = [(e.step, e.value) for e in events.Scalars("eval/loss")]
    # Before training (step 0), at steps 2 and 3, and after training: as in metrics.jsonl.
    assert held_out == [(s, pytest.approx(v, rel=1e-6)) for s, v in _logged(run_dir, "eval_loss")]
    assert [s for s, _ in held_out] == [0, 2, 3, 3]


def test_mlflow_run_in_the_run_directory_holds_the_logged_losses(tracked, monkeypatch):
    import mlflow

    run_dir = tracked[0]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient((run_dir / "mlruns").resolve().as_uri())
    runs = client.search_runs(["0"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run: the held-out figures after training too
    run = runs[0]
    assert run.info.run_name == "run-<redacted>"
    history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(history) == _logged(run_dir, "loss")
    held_out = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss"))
    assert held_out == sorted(_logged(run_dir, "eval_loss"))
    assert run.data.params["learning_rate"] == "0.01" and run.data.params["hub_token"] == "<HUB_TOKEN>"
    assert mlflow.active_run() is None


def test_no_secret_reaches_any_file_of_the_run_directory_trackers_included(tracked):
    run_dir, out, _, _ = tracked
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("tensorboard" in p.parts for p in files) and any("mlruns" in p.parts for p in files)
    for path in files:
        blob = path.read_bytes()
        assert SECRET.encode() not in blob and WANDB_SECRET.encode() not in blob, path
    assert SECRET not in out
    assert not list(run_dir.rglob("*.bin"))  # no pickled Trainer arguments, in checkpoints or the adapter
    run = json.loads((run_dir / "run.json").read_text())
    assert run["recipe"]["train"]["run_name"] == "run-<redacted>"


def test_report_to_names_a_supported_installed_tracker(tmp_path, tiny_llama, chat_file, monkeypatch):
    with pytest.raises(FinetuneError, match=r"train.report_to = 'comet_ml': 'comet_ml' is not supported here; use "
                                            r"none or any of tensorboard, trackio, wandb, mlflow"):
        tiny_recipe(tmp_path, tiny_llama, chat_file, train={"report_to": "comet_ml"})
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(FinetuneError, match=r"test-recipe.yaml: train.report_to names wandb, which is not installed; "
                                            r"install it with pip install 'finetune\[wandb\]'"):
        tiny_recipe(tmp_path, tiny_llama, chat_file, train={"report_to": "tensorboard,wandb"})
    # A comma-separated string (the command line) is a list; none is no tracker.
    recipe = tiny_recipe(tmp_path, tiny_llama, chat_file, train={"report_to": "tensorboard,mlflow"})
    assert recipe.train.args["report_to"] == ["tensorboard", "mlflow"]
    assert tiny_recipe(tmp_path, tiny_llama, chat_file, train={"report_to": "none"}).train.args["report_to"] == "none"


# wandb and trackio are optional extras outside the test extra (69 and 58 MB with their dependencies); these run where
# they are installed (pip install 'finetune[wandb]' / 'finetune[trackio]') and say why they skip elsewhere.


def _wandb_history(run_dir):
    """The history rows of an offline wandb run, read from its .wandb file: a LevelDB-style log (7-byte file header,
    32 KiB blocks, 7-byte record headers) of wandb's protobuf Records."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            chunk = b""
    return rows


def test_wandb_logs_offline_into_the_run_directory(tiny_llama, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not in the test extra: pip install 'finetune[wandb]'")
    run_dir = _tracked_run(tmp_path, tiny_llama, ["wandb"])[0]
    history = _wandb_history(run_dir)
    assert [(r["train/global_step"], r["train/loss"]) for r in history if "train/loss" in r] == \
        _logged(run_dir, "loss")
    assert [(r["train/global_step"], r["eval/loss"]) for r in history if "eval/loss" in r] == \
        _logged(run_dir, "eval_loss")
    for path in (p for p in run_dir.rglob("*") if p.is_file()):
        assert SECRET.encode() not in path.read_bytes() and WANDB_SECRET.encode() not in path.read_bytes(), path
    import wandb

    assert wandb.run is None  # finished, so that a next run in this process starts its own


def test_trackio_logs_to_its_local_database(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("trackio", reason="trackio is not in the test extra: pip install 'finetune[trackio]'")
    from trackio import sqlite_storage, utils
    from trackio.sqlite_storage import SQLiteStorage

    # trackio reads $TRACKIO_DIR once, when first imported (TRL imports it): point this test's writes at tmp_path.
    for module in (utils, sqlite_storage):
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")

    run_dir = _tracked_run(tmp_path, tiny_llama, ["trackio"])[0]
    logs = SQLiteStorage.get_logs("huggingface", "run-<redacted>")
    assert [(r["train/global_step"], r["train/loss"]) for r in logs if r.get("train/loss") is not None] == \
        _logged(run_dir, "loss")
    database = SQLiteStorage.get_project_db_path("huggingface")
    assert database.parent == tmp_path / "trackio"
    assert SECRET.encode() not in database.read_bytes()


def test_each_run_in_one_process_gets_its_own_local_mlflow_run_and_the_environment_is_put_back(tmp_path, monkeypatch):
    import os

    import mlflow

    from finetune.trackers import local_trackers

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_RUN_ID", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for name, fails in (("first", False), ("second", True)):
        with contextlib.suppress(RuntimeError), local_trackers(tmp_path / name, ["mlflow"], name):
            mlflow.log_metric("loss", 1.0, step=1)
            if fails:
                raise RuntimeError("training failed")
        assert mlflow.active_run() is None
        assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, status in (("first", "FINISHED"), ("second", "FAILED")):
        runs = mlflow.MlflowClient((tmp_path / name / "mlruns").as_uri()).search_runs(["0"])
        assert [(r.info.run_name, r.info.status, r.data.metrics) for r in runs] == [(name, status, {"loss": 1.0})]
