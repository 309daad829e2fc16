"""The `finetune` command: one verb per job.

    finetune train RECIPE [key=value ...]     train as the recipe says (accelerate launch -m finetune train ...)
    finetune validate RECIPE [key=value ...]  check recipe and data, show trained tokens, no training
    finetune export RUN_DIR [--out DIR]       merge the adapter into the base; a deployable Chat model folder
    finetune compare --model base=... --model chat=... --prompts ...   outputs side by side, with metrics
    finetune chat MODEL                       talk to a model in the terminal (or answer piped prompts)
    finetune eval MODEL --data NAME           score one model on a dataset, JSON out
    finetune bench [--quick]                  plain TRL defaults vs this toolkit's path: tokens/s, memory, loss

Verbs other than train/validate live in modules with `add_arguments(parser)` and `run(args)`; they import
torch and friends inside `run`, so `finetune --help` stays fast.

Run as a program, the command first re-executes itself once with glibc's malloc set to back its large blocks with
transparent huge pages (`malloc_tunables`); FINETUNE_MALLOC_TUNING=0 turns that off.

A user error prints one line and exits with status 2; `--debug` shows the traceback. Secrets (finetune/rundir.py:
redact) are redacted from everything a verb prints, library logs and progress bars included.
"""

from __future__ import annotations

import argparse
import os
import sys

from finetune.errors import FinetuneError


def _train(args) -> None:
    from finetune import stages
    from finetune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    _print_recipe(recipe)
    stages.get(recipe.train.stage).main(recipe)


def _validate(args) -> None:
    from finetune.recipe import load_recipe
    from finetune.validate import main

    main(load_recipe(args.recipe, args.overrides))


def _print_recipe(recipe) -> None:
    import yaml
    from accelerate import PartialState

    from finetune.rundir import redact

    if int(os.environ.get("RANK", "0")) == 0 and PartialState().is_main_process:
        print("Resolved recipe:\n" + yaml.safe_dump(redact(recipe.to_dict()), sort_keys=False), flush=True)


class RedactingStream:
    """stdout or stderr with secrets redacted from every write (a secret is written whole by one call: a print,
    a log record, a progress bar's line)."""

    def __init__(self, stream, redact):
        self.stream = stream
        self.redact = redact

    def write(self, text):
        self.stream.write(self.redact(text) if isinstance(text, str) else text)
        return len(text)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, ...: the stream's own
        return getattr(self.stream, name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description="Turn a Base model into a Chat model: LoRA/QLoRA recipes over TRL.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    train = verbs.add_parser("train", help="train as a recipe says (run under accelerate launch for several processes)")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/smollm2-135m/sft_qlora.yaml")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. adapter.r=32 train.max_steps=2")
    train.set_defaults(func=_train)

    validate = verbs.add_parser("validate", help="check a recipe and its data, show the trained tokens, train nothing")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    validate.set_defaults(func=_validate)

    import importlib

    for verb, module, help_text in [
        ("export", "finetune.export", "merge a run's adapter into its base and write a checked, deployable Chat model"),
        ("compare", "finetune.compare",
         "generate with several models on the same prompts; report metrics side by side"),
        ("chat", "finetune.chat", "chat with a model in the terminal (reads piped prompts too)"),
        ("eval", "finetune.evaluate", "score one model on a dataset's prompts; JSON out"),
        ("bench", "finetune.bench", "training speed, memory and held-out loss: plain TRL vs this toolkit, one run"),
    ]:
        mod = importlib.import_module(module)
        sub = verbs.add_parser(verb, help=help_text, description=(mod.__doc__ or "").strip().split("\n\n")[0])
        mod.add_arguments(sub)
        sub.set_defaults(func=mod.run)
    return parser


# glibc's malloc returns every freed block over its mmap threshold (32 MiB at most: a chunk of logits, the LM head's
# output) to the kernel, which faults it in again 4 KiB at a time the next step. With transparent huge pages for
# those blocks it faults 2 MiB at a time: the LM head's forward matmul at pretraining's shapes ran 2.1x faster, a
# pretraining step ~1.4x, a LoRA SFT step ~1.1x (finetune bench). Tunables are read when a process starts.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def malloc_tunables(environ=os.environ, thp_mode_file: str = "/sys/kernel/mm/transparent_hugepage/enabled"):
    """The GLIBC_TUNABLES value to re-execute with, or None where it would change nothing: not glibc >= 2.35, huge
    pages already given to every mapping ("always") or to none ("never"), the tunable already set, or turned off."""
    import platform

    tunables = environ.get("GLIBC_TUNABLES", "")
    if environ.get("FINETUNE_MALLOC_TUNING") == "0" or "glibc.malloc.hugetlb" in tunables:
        return None
    libc, version = platform.libc_ver()
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
        with open(thp_mode_file) as f:
            mode = f.read()
    except (OSError, ValueError):
        return None
    if libc != "glibc" or major_minor < (2, 35) or "[madvise]" not in mode:
        return None
    return ":".join(t for t in (tunables, MALLOC_TUNABLE) if t)


def main(argv: list[str] | None = None) -> int:
    import logging

    if argv is None and (tunables := malloc_tunables()):  # run as a program (not called from Python): once
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": tunables})

    # bitsandbytes logs a warning about an optional kernels package on every import; errors still show.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    # Before the verb runs, so that the log handlers the libraries create write through it too.
    from finetune.rundir import redact

    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(sys.stdout, redact), RedactingStream(sys.stderr, redact)
    try:
        args.func(args)
        return 0
    except FinetuneError as e:
        if args.debug:
            raise
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or a library error we have not turned into a clear message yet
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename is not None:
            # A path the system refuses (not found, no permission, a name too long, disk full): the user's to fix.
            print(f"finetune: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"finetune: unexpected {type(e).__name__}: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        sys.stdout, sys.stderr = streams


if __name__ == "__main__":
    sys.exit(main())
