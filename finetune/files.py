"""Outputs that appear whole or not at all, and locks for work shared between processes."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path


def home_dir() -> Path:
    """Where converted models and processed data are cached: $FINETUNE_HOME, else ~/.cache/finetune."""
    return Path(os.environ.get("FINETUNE_HOME") or Path.home() / ".cache" / "finetune")


def _umask() -> int:
    """The process's umask (reading it means setting it, so set it straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text(path: str | Path, text: str) -> None:
    """Write a file atomically: a temp file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private (0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


@contextlib.contextmanager
def file_lock(path: str | Path):
    """An exclusive lock held while the block runs, across processes (e.g. the ranks of one launch)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) == 0
    except (OSError, AttributeError):
        return False


def make_publishable(folder: Path) -> None:
    """mkdtemp and safetensors create private entries (0700/0600); published ones get the umask's modes."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_dir(target: str | Path, replace: bool = False):
    """Build a folder under a temporary name beside `target`; rename it into place when the block ends.

    If the block raises (or the process dies), `target` is untouched and the temporary folder is removed
    (or left under a dot-name that is never mistaken for a result). With `replace`, an existing target is
    swapped for the new folder in one atomic step, so the target path always holds a whole folder.

    The temporary folder is locked (flock) for as long as its process builds it: a folder left by a process that
    died is unlocked, and the next staged_dir of the same target removes it; a live process's is left alone.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp, lock = _staging_folder(target)
    try:
        try:
            yield tmp
            make_publishable(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _publish(tmp, target, replace)
    finally:
        os.close(lock)


def _publish(tmp: Path, target: Path, replace: bool) -> None:
    if target.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(target)
        if _exchange(tmp, target):  # tmp now holds the previous folder
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)



# The temporary folders beside a target: .NAME.partial-XXXXXXXX, locked by the process that builds them.
def _staging_folder(target: Path) -> tuple[Path, int]:
    """A new, empty folder `.NAME.partial-XXXXXXXX` beside `target`, locked; and the descriptor holding the lock.

    It is made under another dot-name and renamed once locked, so a `.partial-` folder is locked from the moment it
    appears: one found unlocked belongs to a process that died."""
    fresh = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    fd = os.open(fresh, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = fresh.with_name(f".{target.name}.partial-{fresh.name.rpartition('.new-')[2]}")
        os.rename(fresh, tmp)
    except BaseException:
        os.close(fd)
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return tmp, fd


def remove_stale_staging(target: str | Path) -> list[Path]:
    """Remove the temporary folders of `target` whose process died while building them (their lock died with it);
    those of live processes stay. Returns the folders removed."""
    target = Path(target)
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # removed meanwhile, or not a folder
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except BlockingIOError:  # locked: its process is alive and building
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def work_dir(target: str | Path):
    """A locked temporary folder beside `target` for intermediate files, removed when the block ends; like
    staged_dir, it first removes the leftovers of processes that died."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp, lock = _staging_folder(target)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def process_alive(pid: int, start_ticks: int | None = None) -> bool | None:
    """Whether process `pid` of this host still runs (and is the same process, when its start time is given):
    True, False, or None where it cannot be told."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    except OSError:
        return None
    if start_ticks is not None:
        now = process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # the pid was reused by another process
    return True


def process_start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None
