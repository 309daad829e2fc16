"""The run directory: what a training run leaves behind, and what later commands read.

    RUN_DIR/
      run.json          resolved recipe, package versions, dataset hashes, git commit, world size, status
      metrics.jsonl     one JSON line per log step (loss, learning rate, eval loss, ...)
      loss_curve.png    train and held-out loss against steps, redrawn while training
      adapter/          the trained adapter (safetensors) and the tokenizer with the inference template
      checkpoints/      checkpoints for train.resume (transformers' format, published whole: finetune/checkpoints.py)
      completions.jsonl grpo/rloo: every sampled answer with its rewards
      tensorboard/ mlruns/ wandb/   the trackers of train.report_to (finetune/trackers.py)

Only the main process writes. Secrets (HF_TOKEN, W&B keys, ...) are redacted from everything written.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from transformers import TrainerCallback

from finetune.errors import FinetuneError
from finetune.files import process_alive, write_json

SECRET_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "COMET_API_KEY", "NEPTUNE_API_TOKEN", "OPENAI_API_KEY",
)
# Any other variable whose name says it holds a credential. Its value is redacted when it is long enough to be one
# and is not a number, a yes/no word or a path (TOKENIZERS_PARALLELISM=false, HF_TOKEN_PATH=/home/me/...): replacing
# those everywhere would garble the run's own settings and paths.
SECRET_NAME_PARTS = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")
MIN_SECRET_LENGTH = 8
# Credentials inside URLs, wherever they appear: the user:password@ (or token@) part, and query parameters that
# carry one (?token=, &api_key=, &X-Amz-Signature=, ...).
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s/?#@]+)@")
URL_SECRET_PARAM = re.compile(
    r"(?i)([?&][\w.\-]*(?:token|key|secret|password|passwd|sig|signature|credential|auth)[\w.\-]*=)([^&#\s\"'<>]+)")
# Keys whose values are credentials. Exact names, so that e.g. pad_token or added_tokens stay readable.
SECRET_KEYS = {"token", "hub_token", "hf_token", "access_token", "auth_token", "api_key", "apikey", "password",
               "secret"}
SECRET_SUFFIXES = ("_api_key", "_password", "_secret", "_access_token", "_auth_token")
PACKAGES = ("finetune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors")


def redact(obj):
    """Replace secrets: any string holding a secret environment variable's value (SECRET_ENV, or a name that says
    TOKEN/KEY/SECRET/PASSWORD) or a credential of a URL held in the environment; credentials inside URLs; values of
    secret-looking keys."""
    return _redact(obj, secret_values())


def _redact(obj, secrets: list[str]):
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if _is_secret_key(str(k)) and isinstance(v, str) and v else _redact(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [_redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, "<redacted>")
        obj = URL_USERINFO.sub(r"\1<redacted>@", obj)
        obj = URL_SECRET_PARAM.sub(r"\1<redacted>", obj)
    return obj


def secret_values() -> list[str]:
    """The secrets the environment holds, longest first (so that one inside another goes whole)."""
    found = set()
    for name, value in os.environ.items():
        if name in SECRET_ENV:
            if len(value) >= 4:
                found.add(value)
        elif any(part in name.upper() for part in SECRET_NAME_PARTS) and _could_be_secret(value):
            found.add(value)
        for _, userinfo in URL_USERINFO.findall(value):  # e.g. MLFLOW_TRACKING_URI=https://me:PASSWORD@host
            found.update(p for p in (userinfo, userinfo.partition(":")[2]) if len(p) >= 4)
        found.update(v for _, v in URL_SECRET_PARAM.findall(value) if len(v) >= 4)
    return sorted(found, key=len, reverse=True)


def _could_be_secret(value: str) -> bool:
    if len(value) < MIN_SECRET_LENGTH or value.lower() in ("true", "false", "none", "null", "enabled", "disabled"):
        return False
    if value.replace(".", "", 1).replace("-", "", 1).isdigit():
        return False
    return not (value.startswith(("/", "~", "./", "../")) or os.path.exists(value))


def _is_secret_key(key: str) -> bool:
    key = key.lower()
    return key in SECRET_KEYS or key.endswith(SECRET_SUFFIXES)


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        repo = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (out.stdout.strip() + ("+dirty" if dirty else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_output_dir(path: Path, resume: bool | int | str, overwrite: bool, source: str) -> None:
    """An existing output_dir is refused unless the recipe resumes it or says to overwrite it."""
    resume_value = resume
    if path.exists() and not path.is_dir():
        raise FinetuneError(f"{source}: output_dir {path} is a file; give a folder path")
    resume = resume is not False
    if not path.exists() or not any(path.iterdir()):
        if resume:
            raise FinetuneError(f"{source}: train.resume is set but {path} holds no run to resume")
        return
    if resume:
        from finetune.checkpoints import resume_target

        resume_target(path, resume_value, source)  # the checkpoint exists and is complete
        return
    if overwrite and not (path / "run.json").is_file():
        raise FinetuneError(
            f"{source}: output_dir {path} exists but is not a run directory (no run.json); overwrite=true only "
            "replaces a previous run. Pick another output_dir"
        )
    if not overwrite:
        raise FinetuneError(
            f"{source}: output_dir {path} already exists; pick another output_dir, resume it with "
            "train.resume=true, or replace it with overwrite=true"
        )


def clear_output_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def read_run(run_dir: str | Path) -> dict:
    """run.json of a run directory, for later commands (export, compare)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FinetuneError(f"{run_dir} is not a run directory: no run.json (train writes one)")
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FinetuneError(f"{path}: not valid JSON ({e}); the run directory is damaged") from None
    if not isinstance(run, dict):
        raise FinetuneError(f"{path}: expected a JSON object; the run directory is damaged")
    process = run.get("process") if isinstance(run.get("process"), dict) else {}
    if run.get("status") == "running" and process.get("host") == socket.gethostname() and isinstance(
            process.get("pid"), int) and process_alive(process["pid"], process.get("start_ticks")) is False:
        # Killed without a chance to say so (SIGKILL, out of memory, power): the run is not running any more.
        run["status"] = "interrupted"
        run.setdefault("error", f"the training process (pid {process['pid']}) ended without finishing; a "
                                "checkpoint in checkpoints/ (if any) can be resumed with train.resume=true")
    return run


def read_completed_run(run_dir: str | Path, what: str) -> dict:
    """run.json of a run that completed and left its adapter (or model) folder, for `what` to build on."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinetuneError(f"{what} {run_dir} does not exist; give a run directory written by `finetune train`")
    run = read_run(run_dir)
    status = run.get("status")
    if status != "completed":
        raise FinetuneError(f"{what} {run_dir}: that run's status is {status!r}, not completed; finish it "
                            "(train.resume=true) or pick a completed run")
    weights = run.get("model") or run.get("adapter") or "adapter"
    if not (run_dir / weights).is_dir():
        raise FinetuneError(f"{what} {run_dir}: its {weights}/ folder is missing; the run directory is damaged")
    return run


class RunRecord:
    """run.json, written atomically by the main process at start, on every status change and at the end."""

    def __init__(self, run_dir: Path, is_main: bool, fields: dict):
        self.path = Path(run_dir) / "run.json"
        self.is_main = is_main
        self.data = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}

    def update(self, **fields) -> None:
        self.data.update(fields)
        if self.is_main:
            write_json(self.path, redact(self.data))


class RunCallback(TrainerCallback):
    """Logs metrics as JSON lines, redraws the loss curve while training, and turns SIGINT/SIGTERM into
    save-and-stop."""

    # One redraw of loss_curve.png took 0.14 s at 50 logged steps and 0.3 s at 10,000 (2 shared CPU cores; the first
    # in a process ~0.8 s, importing matplotlib). It is redrawn on a logging step at most every PLOT_EVERY_S seconds,
    # and so that drawing takes at most PLOT_TIME_SHARE of the time: at most 1% of training time.
    PLOT_EVERY_S = 30.0
    PLOT_TIME_SHARE = 0.01

    def __init__(self, run_dir: Path, is_main: bool):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.next_plot = time.time() + self.PLOT_EVERY_S
        self.interrupted: str | None = None
        self.steps_this_process = 0
        self.start_time = time.time()
        # (num_tokens, seconds) at the first and last log of this session: throughput without loading time,
        # and without the tokens of a run this one resumed.
        self.first_count: tuple[float, float] | None = None
        self.last_count: tuple[float, float] | None = None

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self.interrupted:  # a second signal: stop now
                raise KeyboardInterrupt
            self.interrupted = signal.Signals(signum).name
            print(f"\n{self.interrupted}: saving a checkpoint after this step, then stopping "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

        self._previous_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_this_process += 1
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # A signal reaches one process (kill PID) or the processes at different steps: all stop at the same step,
            # since the save and the next step's gradient reduction are collectives.
            flag = torch.tensor([1.0 if self.interrupted else 0.0], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not self.interrupted:
                self.interrupted = "a signal to another process"
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True

    def restore_signal_handlers(self) -> None:
        """The handlers as they were before install_signal_handlers (a Python caller's own are kept)."""
        for sig, previous in (getattr(self, "_previous_handlers", None) or {}).items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous_handlers = {}

    def tokens_per_second(self) -> float | None:
        if not self.first_count or not self.last_count or self.last_count[1] <= self.first_count[1]:
            return None
        return (self.last_count[0] - self.first_count[0]) / (self.last_count[1] - self.first_count[1])

    def on_log(self, args, state, control, logs=None, **kwargs):
        # TRL's trainers log num_tokens; transformers' Trainer num_input_tokens_seen.
        count = (logs or {}).get("num_tokens", (logs or {}).get("num_input_tokens_seen"))
        if count is not None:
            self.last_count = (float(count), time.time())
            self.first_count = self.first_count or self.last_count
        if not self.is_main or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self.start_time, 2),
               **logs}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(redact(row)) + "\n")
        if time.time() >= self.next_plot:
            started = time.time()
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")
            took = time.time() - started
            self.next_plot = time.time() + max(self.PLOT_EVERY_S, took / self.PLOT_TIME_SHARE if self.PLOT_TIME_SHARE
                                               else 0.0)

    def on_train_end(self, args, state, control, **kwargs):
        if self.is_main:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss_curve.png")


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows; a line cut short (a kill in the middle of appending it) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_losses(metrics_path: Path, png_path: Path) -> Path | None:
    """Train loss per step and held-out loss where evaluated, as a PNG (written atomically)."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not held:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.2)
    if held:
        ax.plot(*zip(*held), "o--", label="held-out loss", color="#d62728")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, png_path)
    return png_path

