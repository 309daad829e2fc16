"""The experiment trackers of `train.report_to`, each kept on this machine.

`train.report_to` names any of tensorboard, trackio, wandb and mlflow, each an optional extra
(`pip install 'finetune[mlflow]'`), or none (the default). Each is kept on this machine:

    tensorboard  event files in RUN_DIR/tensorboard
    mlflow       a file store in RUN_DIR/mlruns, unless MLFLOW_TRACKING_URI names another store
    wandb        offline, in RUN_DIR/wandb (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later)
    trackio      its local database ($TRACKIO_DIR, default ~/.cache/huggingface/trackio); never a Space unless
                 the recipe names one (train.trackio_space_id)

They log transformers' TrainingArguments (its `*_token` fields masked) and the model config; the runner
redacts secrets from the arguments before the trainer sees them (finetune/rundir.py: redact).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

from finetune.errors import FinetuneError

# Each is also the module it imports and the name of the optional extra that installs it.
TRACKERS = ("tensorboard", "trackio", "wandb", "mlflow")


def named(report_to) -> list[str]:
    """The tracker names of a `report_to` value: a name, a comma-separated string, a list, or none."""
    values = report_to if isinstance(report_to, (list, tuple)) else [report_to] if report_to else []
    names = [n.strip() for v in values for n in str(v).split(",") if n.strip()]
    return [] if names == ["none"] else names


def check_report_to(report_to, source: str) -> list[str]:
    """The trackers of `train.report_to`, each supported and installed; else one error before anything loads."""
    names = named(report_to)
    for name in names:
        if name not in TRACKERS:
            raise FinetuneError(
                f"{source}: train.report_to = {report_to!r}: {name!r} is not supported here; use none or any of "
                f"{', '.join(TRACKERS)} (each logs on this machine)"
            )
        if importlib.util.find_spec(name) is None:
            raise FinetuneError(
                f"{source}: train.report_to names {name}, which is not installed; install it with "
                f"pip install 'finetune[{name}]', or remove it from train.report_to"
            )
    return names


@contextlib.contextmanager
def local_trackers(run_dir: Path, names: list[str], run_name: str):
    """While the block (building the trainer, training, the held-out figures) runs: the environment that keeps each
    tracker on this machine, in the run directory (the trackers' callbacks read it when the trainer is built and when
    training begins). Afterwards the environment is put back and the trackers' runs are ended, so that a next run in
    the same process (the Python API) starts its own."""
    run_dir = Path(run_dir).resolve()
    env: dict[str, str | None] = {}
    if "tensorboard" in names and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
        env["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        env["MLFLOW_TRACKING_URI"] = (run_dir / "mlruns").as_uri()
        # MLflow 3 refuses a file store unless asked; its default (sqlite) needs SQLAlchemy, which mlflow-skinny
        # lacks, and creating its tables took ~5 s.
        env["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "wandb" in names:
        # Offline, and without wandb's error reports (sent over the network even offline).
        env.update(WANDB_MODE="offline", WANDB_DIR=str(run_dir), WANDB_ERROR_REPORTING="false")
    if "trackio" in names:
        env.update(TRACKIO_SPACE_ID=None, TRACKIO_SERVER_URL=None)  # a Space or a server named by the environment
    previous = {key: os.environ.get(key) for key in env}
    _set_env(env)
    status = "FAILED"
    try:
        # The mlflow run is ours, not the callback's: the callback ends its run when training ends, and the held-out
        # figures after training would then open a second run. Started by the first process only.
        if "mlflow" in names and int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("MLFLOW_RUN_ID"):
            import mlflow

            mlflow.start_run(run_name=run_name)
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            _end_runs(names, status)
        finally:
            _set_env(previous)


def _end_runs(names: list[str], status: str) -> None:
    """End the trackers' runs still open after training (each logged the held-out figures after training)."""
    if "mlflow" in names:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run(status)
    if "wandb" in names and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish(exit_code=0 if status == "FINISHED" else 1)
    if "trackio" in names and "trackio" in sys.modules:
        trackio = sys.modules["trackio"]
        if trackio.context_vars.current_run.get() is not None:
            trackio.finish()


def _set_env(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
