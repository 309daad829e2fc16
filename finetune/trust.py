"""What finetune will not run: code inside pickles, and a model's own Python code unless a recipe trusts it.

Pickles. Weights are read as safetensors only: an `adapter_model.bin` (a pickle) is refused wherever an adapter is
read (export, compare, chat, model.init_from, a resumed checkpoint). A checkpoint also holds files that only
exist as pickles (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`, and under FSDP the `.metadata` of its sharded
folders, which torch reads with a plain `pickle.load`). Before a resume, each is checked without being run: a
torch.save file may name only what `torch.load(weights_only=True)` allows (plus the numpy types transformers
allows for RNG states), a sharded folder's `.metadata` only torch's checkpoint metadata classes. Anything else is
refused, naming the file.

Model code. A config.json or tokenizer_config.json with `auto_map` names Python files that transformers runs with
`trust_remote_code` (or, for a known `model_type` such as llama, silently ignores, loading the native class
instead). Such a model is refused unless `model.trust_remote_code` is true, and even then a hub model's code runs
only at a pinned commit (`model.revision` and `model.code_revision`, 40 hex digits; `code_revision` is where code
named as `other/repo--module.Class` comes from). A local folder's code is pinned by the sha256 of its .py files,
recorded in run.json (`base_model.code_sha256`); export, compare, chat and eval run it only when asked to
(`--trust-remote-code`: a run.json copied from elsewhere cannot switch it on) and only while the hash matches.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from pathlib import Path

from finetune.errors import FinetuneError

# Weights that exist as safetensors in everything finetune writes; their pickle forms are refused, never loaded.
PICKLED_WEIGHTS = re.compile(r"^(adapter_model|pytorch_model)(-\d+-of-\d+)?\.bin$")
# Files a resume hands to torch.load (weights_only=True in transformers and accelerate) or to pickle.load (torch's
# sharded-checkpoint .metadata): each is checked before the resume.
TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# The Trainer's pickled arguments: written beside checkpoints by transformers, never read by a resume.
NOT_READ_ON_RESUME = ("training_args.bin",)
PINNED = re.compile(r"^[0-9a-f]{40}$")
TRUST_HINT = ("if you trust that code, set model.trust_remote_code: true in the recipe (export, compare, chat, eval: "
              "--trust-remote-code); else remove auto_map")


# ----------------------------------------------------------------------------- pickles


def check_adapter_folder(folder: Path, what: str = "adapter") -> None:
    """An adapter is read as safetensors only: a folder holding `adapter_model.bin` (a pickle) is refused."""
    pickled = Path(folder) / "adapter_model.bin"
    if pickled.is_file():
        raise FinetuneError(f"{pickled}: the {what} is a pickle (adapter_model.bin), which can run code when loaded; "
                            "finetune reads adapters as safetensors only: save it as adapter_model.safetensors (peft's "
                            "default) and delete the .bin")


def check_checkpoint(folder: Path, source: str = "train.resume") -> None:
    """Refuse a checkpoint any of whose files would run code when a resume loads it (nothing is unpickled here)."""
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.name
        if name in NOT_READ_ON_RESUME:
            continue
        if PICKLED_WEIGHTS.match(name):
            raise FinetuneError(f"{source}: {path} holds weights as a pickle, which can run code when loaded; "
                                "finetune resumes from safetensors weights only. Resume another checkpoint or "
                                "delete this one")
        if name.endswith(".metadata"):
            problem = _dcp_metadata_problem(path)
        elif name.endswith(TORCH_SAVE_SUFFIXES):
            problem = _torch_save_problem(path)
        else:
            continue
        if problem:
            raise FinetuneError(f"{source}: {path} {problem}; a checkpoint written by training holds only tensors "
                                "and plain values. Resume another checkpoint or delete this one")


def _torch_save_problem(path: Path) -> str | None:
    """Why torch.load(weights_only=True) of this file would be refused (or would run code elsewhere), or None."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():  # the numpy types transformers allows when it loads RNG states
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a torch.save zip file, or opcodes the static reader does not know
        return f"cannot be checked as a torch.save file ({type(e).__name__}: {e})"
    if unsafe:
        return f"names code to run when loaded ({', '.join(sorted(unsafe))})"
    return None


def _dcp_metadata_problem(path: Path) -> str | None:
    """A sharded checkpoint's .metadata, which torch.distributed.checkpoint reads with pickle.load: unpickled here
    with only its metadata classes allowed, so nothing else can be called."""
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except _Refused as e:
        return f"names code to run when loaded ({e})"
    except Exception as e:
        return f"cannot be read as checkpoint metadata ({type(e).__name__}: {e})"
    return None


class _Refused(Exception):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    # What torch.distributed.checkpoint writes in .metadata: its metadata dataclasses, the storage index of the
    # filesystem writer, torch dtypes, sizes and layouts, paths.
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
               ("collections", "OrderedDict")}
    METADATA_MODULE = "torch.distributed.checkpoint.metadata"

    def find_class(self, module, name):
        import torch

        allowed = (module, name) in self.ALLOWED
        if module == self.METADATA_MODULE:
            import torch.distributed.checkpoint.metadata as metadata

            allowed = isinstance(getattr(metadata, name, None), type)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


# ----------------------------------------------------------------------------- model code


def code_references(folder: Path) -> dict[str, list[str]]:
    """The `auto_map` entries of a model folder's config.json and tokenizer_config.json: {file: [class refs]}."""
    found = {}
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # transformers' own loading reports an unreadable config
        if auto_map:
            refs = [r for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
                    for r in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(r, str)]
            found[str(path)] = refs or [str(auto_map)]
    return found


def code_sha256(folder: Path) -> str | None:
    """sha256 over a folder's .py files (relative paths and contents, in path order); None when it has none."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*.py") if p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def check_model_code(source: str, trust: bool, revision: str | None = None, code_revision: str | None = None,
                     expected_sha256: str | None = None) -> str | None:
    """Refuse a model's own Python code unless trusted and pinned (module docstring). `source` is a local folder or
    a hub id; returns the sha256 of a trusted local folder's .py files (None otherwise)."""
    folder = Path(source).expanduser()
    local = folder.is_dir()
    if trust and not local:
        unpinned = [f"model.{key} = {value!r}" for key, value in (("revision", revision),
                                                                   ("code_revision", code_revision))
                    if not (isinstance(value, str) and PINNED.match(value))]
        if unpinned:
            raise FinetuneError(f"model {source!r} with model.trust_remote_code: true runs the hub repo's Python code, "
                                f"which its owner can change at any time: pin it ({', '.join(unpinned)}); set "
                                "model.revision and model.code_revision to commit hashes (40 hex digits)")
        return None
    refs = code_references(folder) if local else _hub_code_references(source, revision)
    if refs and not trust:
        file, names = next(iter(refs.items()))
        raise FinetuneError(f"{file}: auto_map names Python code shipped with the model ({', '.join(names)}), and "
                            f"model.trust_remote_code is false; {TRUST_HINT}")
    if not local:
        return None
    elsewhere = [r for names in refs.values() for r in names if "--" in r]
    if elsewhere and not (isinstance(code_revision, str) and PINNED.match(code_revision)):
        raise FinetuneError(f"{folder}: auto_map takes code from another hub repo ({', '.join(elsewhere)}), which "
                            "a hash of this folder cannot pin; set model.code_revision to that repo's commit hash (40 "
                            "hex digits)")
    digest = code_sha256(folder)
    if expected_sha256 and digest != expected_sha256:
        raise FinetuneError(f"{folder}: its Python code changed since the run was trained (sha256 of its .py files "
                            f"{digest}, run.json records {expected_sha256}); check the change, or train again")
    return digest


def _hub_code_references(repo: str, revision: str | None) -> dict[str, list[str]]:
    """code_references of a hub model, from its (cached or downloaded) config files; {} where they cannot be read
    (transformers then fails to load the model too)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return {}
    found = {}
    for name in ("config.json", "tokenizer_config.json"):
        try:
            path = Path(hf_hub_download(repo, name, revision=revision))
        except Exception:  # offline, missing file, unknown repo: nothing to read
            continue
        refs = code_references(path.parent).get(str(path))
        if refs:
            found[f"{repo}/{name}"] = refs
    return found


def check_run_code(run: dict, run_dir: Path, trusted: bool) -> bool:
    """A run whose recipe trusted its base model's code: run that code only when the caller says so (a run.json
    from elsewhere cannot switch it on) and, for a local base, only while its .py files hash as recorded. Returns
    whether the run's model may run code."""
    model = (run.get("recipe") or {}).get("model") or {}
    if not model.get("trust_remote_code"):
        return False
    base = run.get("base_model") or {}
    if not trusted:
        raise FinetuneError(f"{Path(run_dir) / 'run.json'}: the run was trained with model.trust_remote_code: true "
                            f"(its base {base.get('name') or model.get('name')!r} runs its own Python code); if you "
                            "trust that code, pass --trust-remote-code")
    path, recorded = base.get("path"), base.get("code_sha256")
    if path and Path(path).is_dir():
        digest = check_model_code(path, True, model.get("revision"), model.get("code_revision"), recorded)
        if digest and not recorded:
            raise FinetuneError(f"{Path(run_dir) / 'run.json'}: base_model.code_sha256 is missing, so the Python code "
                                f"in {path} cannot be checked against what the run trained with; train the run again")
    return True
