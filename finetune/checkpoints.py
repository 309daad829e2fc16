"""Checkpoints that are whole or absent, and which one a resume continues.

    RUN_DIR/checkpoints/
      checkpoint-<step>/                        published: complete, what train.resume reads
      .staging-checkpoint-<step>-<pid>@<host>/   being written (or left by a process that died while writing)
      .deleting-checkpoint-<step>-<pid>/        pruned (save_total_limit), being deleted
      abandoned-<time>-<pid>/checkpoint-<step>/ later checkpoints set aside when a run resumed an earlier one

The Trainer writes a checkpoint file by file into its final folder, so a kill or a full disk mid-save leaves a
folder that looks like a checkpoint and is not one. Here every process writes into a staging folder what the Trainer
has it write (the main process: weights, optimizer, scheduler, trainer state; each rank its RNG state; under
FSDP/DeepSpeed each rank its shards); once all have finished, the main process drops
the pickled training arguments, flushes the files to disk and publishes the folder with one rename. Only then
are old checkpoints pruned (save_total_limit). A failed save removes its staging folder and leaves the
previous checkpoint as the one a resume takes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.files import process_alive, write_text

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = re.compile(r"^\.staging-checkpoint-(\d+)-(\d+)@(.+)$")
# A checkpoint is complete when the Trainer's last file is there (written after weights, optimizer and RNG).
LAST_FILE = "trainer_state.json"


def install(trainer) -> None:
    """Make the trainer's checkpoints atomic: staged, published by one rename, pruned after publishing.

    The Trainer has no hook around its checkpoint save, so its `_save_checkpoint` (the stage's override
    included) runs with `_get_output_dir` pointing at the staging folder; what it recorded about that folder
    (the best checkpoint's path) is pointed at the published one, and a push to the hub sends the published one.
    """
    save, output_dir = trainer._save_checkpoint, trainer._get_output_dir
    staging_root: list[str] = []
    published_steps: set[int] = set()

    def staged_output_dir(trial=None):
        return staging_root[-1] if staging_root else output_dir(trial)

    def atomic_save(model, trial=None):
        root = Path(output_dir(trial))
        step = trainer.state.global_step
        if step in published_steps:  # e.g. an interrupt's save, then the epoch end's at the same step
            return
        stage = root / f".staging-checkpoint-{step}-{_writer(trainer)}"
        args = trainer.args
        limit, push = args.save_total_limit, args.push_to_hub
        args.save_total_limit, args.push_to_hub = None, False  # prune and push only what is published
        staging_root.append(str(stage))
        try:
            save(model, trial)
        except Exception as e:
            if args.should_save:
                shutil.rmtree(stage, ignore_errors=True)
            raise FinetuneError(_failed_save_message(root, step, e)) from e
        finally:
            staging_root.clear()
            args.save_total_limit, args.push_to_hub = limit, push
        final = root / f"checkpoint-{step}"
        best = trainer.state.best_model_checkpoint
        if best and str(best).startswith(str(stage)):
            trainer.state.best_model_checkpoint = str(final)
            if args.should_save:
                trainer.state.save_to_json(str(stage / final.name / LAST_FILE))
        trainer.accelerator.wait_for_everyone()  # every rank's files (its RNG state, shards) are in the staging folder
        if args.should_save:
            publish(stage / final.name, final)
            shutil.rmtree(stage, ignore_errors=True)
            if limit and limit > 0:
                prune(root, limit, keep=trainer.state.best_model_checkpoint)
            if push:
                trainer._push_from_checkpoint(str(final))
        published_steps.add(step)
        trainer.accelerator.wait_for_everyone()

    trainer._get_output_dir = staged_output_dir
    trainer._save_checkpoint = atomic_save


def _writer(trainer) -> str:
    """pid@host of the first process, the same on every rank (each rank writes into the same staging folder)."""
    mine = [f"{os.getpid()}@{socket.gethostname()}"]
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(mine, src=0)
    return mine[0]


def publish(staged: Path, final: Path) -> None:
    """Flush the staged checkpoint to disk and rename it into place (an existing one of that step set aside)."""
    (staged / "training_args.bin").unlink(missing_ok=True)  # a pickle, and it can hold tokens: run.json has it
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    if final.exists():  # left by an earlier session (not resumed from): keep the newer, set the old one aside
        set_aside(final.parent, [final])
    os.rename(staged, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)


def prune(root: Path, limit: int, keep: str | None = None) -> None:
    """Delete the oldest published checkpoints (by step) beyond save_total_limit, never the best one (`keep`, as
    transformers keeps it): each renamed out of sight first, so that a kill while deleting never leaves a
    half-deleted checkpoint-N to be resumed."""
    found = sorted(published(root))
    if keep and Path(keep).exists():
        found = [(s, p) for s, p in found if not p.samefile(keep)]
        limit = max(limit - 1, 1)
    for step, path in found[:-limit]:
        doomed = root / f".deleting-{path.name}-{os.getpid()}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def step_of(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was written at."""
    return int(json.loads((Path(checkpoint) / LAST_FILE).read_text()).get("global_step", 0))


def published(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]


def clean_staging(root: Path) -> list[Path]:
    """Remove staging folders left by processes of this host that no longer run (never a live process's), and
    pruned checkpoints whose deletion was cut short."""
    removed = []
    if not root.is_dir():
        return removed
    for path in root.iterdir():
        m = STAGING.match(path.name)
        if (m and m.group(3) == socket.gethostname() and process_alive(int(m.group(2))) is False
                or path.name.startswith(".deleting-checkpoint-")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def set_aside(root: Path, paths: list[Path]) -> Path:
    """Move checkpoints out of resume's way, into root/abandoned-<time>/ (kept, not deleted)."""
    aside = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir(parents=True, exist_ok=True)
    for path in paths:
        os.rename(path, aside / path.name)
    return aside


def resume_target(run_dir: Path, resume, source: str) -> Path:
    """The checkpoint that train.resume names: true (the last complete one), a step, or a folder."""
    root = Path(run_dir) / "checkpoints"
    found = dict(published(root))
    if resume is True:
        if not found:
            raise FinetuneError(f"{source}: train.resume is true but {root} holds no complete checkpoint")
        path = found[max(found)]
    elif isinstance(resume, int):
        if resume not in found:
            raise FinetuneError(f"{source}: train.resume = {resume}: {root} has no checkpoint-{resume}; it has "
                                f"{', '.join(f'checkpoint-{s}' for s in sorted(found)) or 'none'}")
        path = found[resume]
    else:
        path = Path(resume)
        if not path.is_dir() or not CHECKPOINT.match(path.name):
            raise FinetuneError(f"{source}: train.resume = {resume}: not a checkpoint folder (checkpoint-<step>); "
                                "give true, a step, or a folder under RUN_DIR/checkpoints")
        if path.resolve().parent != root.resolve():
            raise FinetuneError(f"{source}: train.resume = {resume} is not a checkpoint of output_dir {run_dir}; "
                                f"resume a run in its own output_dir (its checkpoints are in {root})")
    if not (path / LAST_FILE).is_file():
        raise FinetuneError(f"{source}: {path} is incomplete (no {LAST_FILE}); resume an earlier checkpoint")
    return path


def prepare_resume(run_dir: Path, checkpoint: Path) -> dict:
    """Before a resume (main process): clean dead staging folders, set later checkpoints aside, and drop the
    metrics logged after the checkpoint (they are logged again), so that metrics.jsonl holds each step once."""
    root = Path(run_dir) / "checkpoints"
    step = int(CHECKPOINT.match(checkpoint.name).group(1))
    cleaned = clean_staging(root)
    for partial in [*Path(run_dir).glob(".adapter.partial-*"), *Path(run_dir).glob(".model.partial-*")]:
        shutil.rmtree(partial, ignore_errors=True)  # a final save cut short (only this run's trainer writes these)
    later = [p for s, p in sorted(published(root)) if s > step]
    aside = set_aside(root, later) if later else None
    metrics = Path(run_dir) / "metrics.jsonl"
    dropped = 0
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                row_step = json.loads(line).get("step", 0)
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short by a kill
            if row_step <= step:
                keep.append(line)
        dropped = len(lines) - len(keep)
        write_text(metrics, "".join(line + "\n" for line in keep))
    return {"step": step, "cleaned": [p.name for p in cleaned], "set_aside": [p.name for p in later],
            "aside_dir": aside.name if aside else None, "metrics_dropped": dropped}


def resume_differences(previous: dict, recipe: dict, hashes: dict, versions: dict) -> list[str]:
    """What differs between the run being resumed (its run.json) and this one: recipe keys, data, libraries."""
    # What may change at a resume: how it resumes, and what to do with a NaN (the usual reason to resume).
    ignore = {"train.resume", "train.resume_changes", "overwrite", "train.on_nonfinite", "train.max_nonfinite_skips"}
    old, new = _flat(previous.get("recipe") or {}), _flat(json.loads(json.dumps(recipe, default=str)))
    out = [f"{key} {_show(old, key)} -> {_show(new, key)}" for key in sorted(old.keys() | new.keys())
           if key not in ignore and old.get(key, _UNSET) != new.get(key, _UNSET)]
    old_hashes = previous.get("dataset_hashes") or {}
    out += [f"data {name} sha256 {str(old_hashes.get(name))[:12]} -> {str(hashes.get(name))[:12]}"
            for name in sorted(old_hashes.keys() | hashes.keys()) if old_hashes.get(name) != hashes.get(name)]
    old_versions = previous.get("versions") or {}
    out += [f"{name} {old_versions.get(name)} -> {versions.get(name)}"
            for name in sorted(old_versions.keys() | versions.keys()) if old_versions.get(name) != versions.get(name)]
    return out


_UNSET = object()


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def _show(flat: dict, key: str) -> str:
    return "(unset)" if key not in flat else json.dumps(flat[key])


def _failed_save_message(root: Path, step: int, error: Exception) -> str:
    previous = sorted(published(root))
    kept = (f"the previous checkpoint {previous[-1][1].name} is intact and is what train.resume=true continues "
            "from" if previous else "no earlier checkpoint exists")
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free on that disk"
    except OSError:
        free = ""
    return (f"saving checkpoint-{step} in {root} failed ({type(error).__name__}: {error}){free}. Nothing of it was "
            f"published: {kept}. Free space (or lower train.save_total_limit) and resume")
