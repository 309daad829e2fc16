"""Batched vs one-at-a-time generation with the embedded SmolLM2, as `finetune compare` runs it.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 32] [--max-new-tokens 48] [--batch-sizes 32 16]
        [--dtype auto] [--threads N]

Loads embedded:smollm2-135m with finetune.generate.load_for_inference (the settings compare uses: dtype
auto, chat template, left padding, KV cache), takes the first N held-out prompts of json_extract, and
generates greedily with each batch size and then one prompt at a time. Tokens/s counts the tokens each
answer really has (its text plus the stop token), not padding. Progress goes to stderr; one JSON object
(figures, speed-up of each batch size over one-at-a-time, and how many answers agree token for token
with one-at-a-time, which in bf16 need not be all) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from finetune.compare import load_prompts
    from finetune.generate import generate, load_for_inference, quiet_libraries

    with quiet_libraries():
        if args.threads:
            torch.set_num_threads(args.threads)
        loaded = load_for_inference("embedded:smollm2-135m", dtype=args.dtype)
        prompts = load_prompts("json_extract", "heldout", args.prompts).messages
        generate(loaded, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up: first-call allocations

        def timed(batch_size: int) -> tuple[dict, list[dict]]:
            start = time.perf_counter()
            if batch_size == 1:
                outs = [generate(loaded, [p], max_new_tokens=args.max_new_tokens)[0] for p in prompts]
            else:
                outs = generate(loaded, prompts, max_new_tokens=args.max_new_tokens, batch_size=batch_size)
            seconds = time.perf_counter() - start
            tokens = sum(len(o["token_ids"]) + (1 if o["stopped"] else 0) for o in outs)
            row = {"batch_size": batch_size, "seconds": round(seconds, 2), "tokens": tokens,
                   "tokens_per_second": round(tokens / seconds, 1), "stopped": sum(o["stopped"] for o in outs)}
            print(f"batch {batch_size:>2}: {tokens} tokens in {seconds:.1f} s = {row['tokens_per_second']} tokens/s",
                  file=sys.stderr, flush=True)
            return row, outs

        runs = {bs: timed(bs) for bs in args.batch_sizes}
        single, single_outs = timed(1)
        result = {
            "model": loaded.description,
            "dtype": loaded.dtype,
            "threads": torch.get_num_threads(),
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "decoding": "greedy",
            "one_at_a_time": single,
            "batched": [
                {**row, "speedup": round(row["tokens_per_second"] / single["tokens_per_second"], 2),
                 "same_tokens_as_one_at_a_time": sum(a["token_ids"] == b["token_ids"]
                                                     for a, b in zip(outs, single_outs))}
                for row, outs in runs.values()
            ],
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
