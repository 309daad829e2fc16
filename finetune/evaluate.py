"""finetune eval MODEL --data NAME [--split heldout] [--max-prompts N] [decoding flags] [--out FILE]

Score one model on a dataset's prompts, the scoring half of `finetune compare`: generate an answer to
every prompt, then report stop rate, lengths, repetition, format adherence and, against the references,
exact match, token F1 and ROUGE-L. Prints one JSON object (model, description, settings, metrics,
timing) and writes it to --out when given.

MODEL is `embedded:smollm2-135m`, a run directory, a local HF model folder or a hub id; --data is a
datasets_cfg/ name, a dataset YAML or data file, or a .jsonl prompt file (see `finetune compare -h`).

Example:
    finetune eval runs/demo --data json_extract --out runs/demo/eval.json
"""

from __future__ import annotations

import argparse
import json
import time

from finetune.errors import FinetuneError
from finetune.generate import PROMPT_STYLES, add_decoding_arguments, add_model_arguments, decoding_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("model", metavar="MODEL",
                        help="embedded:smollm2-135m, a run directory, a model folder or a hub id")
    parser.add_argument("--data", required=True, metavar="NAME",
                        help="a datasets_cfg name (e.g. json_extract), a dataset YAML or data file, or a .jsonl "
                             "prompt file")
    parser.add_argument("--split", default=None, help="dataset split (default: heldout, else the only split)")
    parser.add_argument("--max-prompts", type=int, default=None, metavar="N", help="use the first N prompts")
    parser.add_argument("--prompt-style", default=None, choices=PROMPT_STYLES,
                        help="how prompts are written; default chat when the tokenizer has a chat template, else raw")
    parser.add_argument("--adherence-regex", default=None, metavar="RE",
                        help="what a well-formed answer looks like (whole answer); default: the dataset's")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON here")
    add_model_arguments(parser)
    add_decoding_arguments(parser)


def evaluate(model: str, data: str, split: str | None = None, max_prompts: int | None = None,
             settings: dict | None = None, dtype: str = "auto", prompt_style: str | None = None,
             adherence_regex: str | None = None, trust_remote_code: bool = False) -> dict:
    """Score one model on a dataset: the dict `finetune eval` prints."""
    from finetune.compare import check_regex, load_prompts, score_model
    from finetune.generate import check_decoding, check_spec, settings_for_report

    settings = settings or {}
    check_spec(model)
    check_decoding(**settings)
    prompts = load_prompts(data, split, max_prompts)
    regex = adherence_regex if adherence_regex is not None else prompts.adherence_regex
    check_regex(regex)
    start = time.time()
    record, _, metrics = score_model("model", model, prompts, settings, regex, dtype, prompt_style, trust_remote_code)
    return {
        "model": model,
        "description": record["description"],
        "settings": {"data": prompts.source, "split": prompts.split, "n_prompts": len(prompts.items),
                     **settings_for_report(settings), "dtype": dtype, "prompt_style": record["prompt_style"],
                     "adherence_regex": regex},
        "metrics": metrics,
        "timing": {"seconds": round(time.time() - start, 1), "load_seconds": record["load_seconds"],
                   "generate_seconds": record["generate_seconds"], "tokens_per_second": record["tokens_per_second"]},
    }


def run(args) -> None:
    """The verb, with library chatter quieted and put back as it was on return."""
    from finetune.generate import quiet_libraries

    with quiet_libraries():
        _run(args)


def _run(args) -> None:
    from finetune.files import write_json
    from finetune.generate import apply_threads

    if args.max_prompts is not None and args.max_prompts < 1:
        raise FinetuneError(f"--max-prompts must be at least 1, got {args.max_prompts}")
    apply_threads(args)
    result = evaluate(args.model, args.data, args.split, args.max_prompts, decoding_settings(args), args.dtype,
                      args.prompt_style, args.adherence_regex, args.trust_remote_code)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
