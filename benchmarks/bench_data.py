"""Data preparation at scale: rows/s and peak memory of `finetune.data.prepare` on generated chat sets.

    .venv/bin/python benchmarks/bench_data.py [--rows 20000 200000] [--heldout 1000] [--num-proc N]
        [--max-length 512]

For each size, a child process writes that many generated multi-turn conversations (system prompt, two
user/assistant exchanges, ~90 words each, drawn with Zipf frequencies from 5,000 pseudo-words) to a JSONL
file, then prepares them as an SFT recipe would with the embedded SmolLM2 tokenizer and template (fresh
cache; 1,000 held-out rows for the overlap check, whose index grows with the held-out set, not the training
set). It reports the seconds, rows/s, and peak RSS of the process and of its tokenizing workers (ru_maxrss),
and the process's peak anonymous and file-backed (memory-mapped Arrow files, which the kernel can drop)
resident memory. Memory bounded by the batch, not by the dataset, shows as peak anonymous memory that does not
grow with the row count. One JSON object goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def _vocabulary(n: int = 5000, seed: int = 7) -> tuple[list[str], list[float]]:
    """Pseudo-words with Zipf frequencies, like a text's vocabulary."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(n)]
    return words, [1 / (rank + 1) for rank in range(n)]


WORDS, WEIGHTS = _vocabulary()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, WEIGHTS, k=n)).capitalize() + "."


def write_rows(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(rows):
            messages = [{"role": "system", "content": "Answer briefly."}]
            for _ in range(2):
                messages.append({"role": "user", "content": f"Q{i}: " + _sentence(rng, 20)})
                messages.append({"role": "assistant", "content": _sentence(rng, 25)})
            f.write(json.dumps({"messages": messages}) + "\n")


class MemorySampler:
    """Peak anonymous and file-backed resident memory of this process (/proc/self/status, sampled every 0.1 s):
    ru_maxrss also counts the pages of memory-mapped Arrow files that were read, which the kernel can drop."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.done.wait(0.1):
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) // 1024)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def one(rows: int, heldout: int, num_proc: int | None, max_length: int) -> dict:
    from finetune import data, models, templates
    from finetune.recipe import DataConfig, build_section

    tokenizer = models.load_tokenizer(models.resolve_model("embedded:smollm2-135m"))
    chat = templates.resolve(tokenizer, "auto")
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        tmp = Path(tmp)
        write_rows(tmp / "train.jsonl", rows)
        write_rows(tmp / "heldout.jsonl", heldout, seed=1)
        cfg = build_section(DataConfig, {
            "datasets": [str(tmp / "train.jsonl")], "eval_datasets": [str(tmp / "heldout.jsonl")],
            "max_length": max_length, "cache_dir": str(tmp / "cache"), "num_proc": num_proc}, "data", "bench")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        with MemorySampler() as memory:
            prepared = data.prepare(cfg, tokenizer, chat)
        seconds = time.perf_counter() - start
    return {
        "rows": rows, "heldout_rows": heldout, "num_proc": num_proc or "auto", "seconds": round(seconds, 1),
        "rows_per_second": round(rows / seconds), "train_tokens": prepared.stats["train_tokens"],
        "peak_rss_mib_before_prepare": round(rss_before),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_anonymous_mib": memory.peak["RssAnon"], "peak_file_backed_mib": memory.peak["RssFile"],
        "peak_rss_mib_workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20000, 200000])
    parser.add_argument("--heldout", type=int, default=1000, help="held-out rows (the overlap check indexes them)")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizing processes (default: data's auto)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(one(args.child, args.heldout, args.num_proc, args.max_length)))
        return
    results = []
    for rows in args.rows:
        cmd = [sys.executable, __file__, "--child", str(rows), "--max-length", str(args.max_length),
               "--heldout", str(args.heldout)]
        if args.num_proc:
            cmd += ["--num-proc", str(args.num_proc)]
        print(f"preparing {rows} rows ...", file=sys.stderr)
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
