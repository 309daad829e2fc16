"""finetune compare --model base=SPEC --model chat=SPEC [--model NAME=SPEC ...] --prompts DATA [options]

Generate with several models on the same prompts, one model in memory at a time, score every model's
outputs (stop rate, lengths, repetition, format adherence, exact match, token F1, ROUGE-L) and write
report.md, report.html (outputs side by side), results.jsonl (one line per prompt per model) and
compare.json (settings, model descriptions, metrics, timings) into --out (default runs/compare-TIME).

A model SPEC is `embedded:smollm2-135m`, a run directory (base + its LoRA adapter, the base loaded as
it was trained), a local HF model folder (e.g. an export) or a hub id (needs network).

--prompts is a datasets_cfg/ name, a dataset YAML, or a data file. From a dataset, the split is
`heldout` when there is one (else the only split; --split picks another); a row's prompt is every
message before its last assistant turn and the reference is that turn; the dataset's `adherence_regex`
is the default format check. A .jsonl prompt file has one object per line with `prompt` (text) or
`messages` (chat messages; a final assistant turn is taken as the reference), and optionally
`reference`.

Example:
    finetune compare --model base=embedded:smollm2-135m --model chat=runs/demo --prompts json_extract
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.generate import PROMPT_STYLES, add_decoding_arguments, add_model_arguments, decoding_settings


@dataclass
class PromptSet:
    """Prompts and references read from a dataset or a prompt file."""

    items: list[dict]  # {"messages": [...], "prompt": display text, "reference": str | None}
    source: str
    split: str | None = None
    adherence_regex: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def messages(self) -> list[list[dict]]:
        return [item["messages"] for item in self.items]

    @property
    def references(self) -> list[str | None]:
        return [item["reference"] for item in self.items]


# ----------------------------------------------------------------------------- prompts


def display_prompt(messages: list[dict]) -> str:
    """A prompt as reports show it: the user's text alone, or role-labelled turns when there are several."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def _split_conversation(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt messages, reference): the reference is the last assistant turn, the prompt what precedes it."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, None
    return messages[:last], messages[last]["content"]


def load_prompts(source: str, split: str | None = None, max_prompts: int | None = None) -> PromptSet:
    """Prompts from a .jsonl prompt file, or from a dataset (datasets_cfg name, YAML or data file)."""
    if max_prompts is not None and max_prompts < 1:
        raise FinetuneError(f"--max-prompts must be at least 1, got {max_prompts}")
    path = Path(source).expanduser()
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FinetuneError(f"prompt file {source} not found")
        if _looks_like_prompt_file(path):
            items = _read_prompt_file(path, max_prompts)
            return PromptSet(items, str(path), None, None)
    return _read_dataset(source, split, max_prompts)


def _looks_like_prompt_file(path: Path) -> bool:
    """A .jsonl is a prompt file unless its first row is in another dataset format (prompt_completion,
    sharegpt, alpaca, ...): those are read as a dataset, their answers becoming references."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return True  # the prompt-file reader names the broken row
                if not isinstance(row, dict) or "messages" in row:
                    return True
                return not ({"completion", "conversations", "instruction", "chosen", "text"} & set(row))
    return True


def _read_prompt_file(path: Path, max_prompts: int | None) -> list[dict]:
    from finetune.data import check_messages

    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_prompts is not None and len(items) >= max_prompts:
                break
            if not line.strip():
                continue
            where = f"{path}: row {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{where}: unparsable JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise FinetuneError(f"{where}: expected an object with `prompt` or `messages`")
            reference = row.get("reference")
            if reference is not None and not isinstance(reference, str):
                raise FinetuneError(f"{where}: `reference` is {type(reference).__name__}, not text")
            if "prompt" in row:
                prompt = row["prompt"]
                if not isinstance(prompt, str) or not prompt.strip():
                    raise FinetuneError(f"{where}: `prompt` is not non-empty text")
                messages = [{"role": "user", "content": prompt}]
            elif "messages" in row:
                messages = row["messages"]
                if not isinstance(messages, list) or not messages:
                    raise FinetuneError(f"{where}: `messages` is not a non-empty list")
                has_answer = isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
                # The data checks expect a conversation that ends with an answer; a prompt ends before it.
                placeholder = [] if has_answer else [{"role": "assistant", "content": "(answer)"}]
                problem = check_messages([*messages, *placeholder])
                if problem:
                    raise FinetuneError(f"{where}: {problem}")
                if has_answer:
                    messages, answer = _split_conversation(messages)
                    reference = reference if reference is not None else answer
                if not messages or messages[-1]["role"] != "user":
                    raise FinetuneError(f"{where}: the prompt must end with a user message")
                messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            else:
                raise FinetuneError(f"{where}: no `prompt` or `messages` (keys: {', '.join(sorted(row)) or 'none'})")
            items.append({"messages": messages, "prompt": display_prompt(messages), "reference": reference})
    if not items:
        raise FinetuneError(f"{path}: no prompts in the file")
    return items


def _read_dataset(name: str, split: str | None, max_prompts: int | None) -> PromptSet:
    from finetune.data import RowError, load_spec, read_rows, to_messages

    spec = load_spec(name)
    splits = list(spec.files) or list(spec.hub_splits)
    if split is None:
        if "heldout" in splits or (spec.hub and not splits):
            split = "heldout"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise FinetuneError(f"{spec.source}: no 'heldout' split; pick one with --split ({', '.join(splits)})")
    rows, _ = read_rows(spec, split, max_prompts)
    where = spec.files.get(split, spec.hub or spec.source)
    items = []
    for rowno, row in rows:
        converted = to_messages(spec, row)
        if isinstance(converted, RowError):
            raise FinetuneError(f"{where}: row {rowno}: {converted}")
        if isinstance(converted, str):
            raise FinetuneError(f"{spec.source}: format text has no prompts and answers; give a prompt file (.jsonl)")
        messages, reference = _split_conversation(converted)
        items.append({"messages": messages, "prompt": display_prompt(messages), "reference": reference})
    if not items:
        raise FinetuneError(f"{where}: split '{split}' has no rows")
    return PromptSet(items, spec.source, split, spec.adherence_regex)


# ----------------------------------------------------------------------------- models


def parse_pairs(values: list[str] | None, flag: str, example: str) -> dict[str, str]:
    """NAME=VALUE flags (in order), names unique."""
    pairs: dict[str, str] = {}
    for value in values or []:
        name, sep, rest = value.partition("=")
        if not sep or not name.strip() or not rest.strip():
            raise FinetuneError(f"{flag} {value!r}: expected NAME=VALUE, e.g. {flag} {example}")
        if name in pairs:
            raise FinetuneError(f"{flag}: the name {name!r} is given twice; give each model its own name")
        pairs[name.strip()] = rest.strip()
    return pairs


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def score_model(name: str, spec: str, prompts: PromptSet, settings: dict, adherence_regex: str | None,
                dtype: str = "auto", prompt_style: str | None = None,
                trust_remote_code: bool = False) -> tuple[dict, list[dict], dict]:
    """Load one model, answer every prompt, score the answers, free the model.

    Returns (model record for reports, outputs, metrics)."""
    from finetune.generate import generate, load_for_inference, release
    from finetune.metrics import summarize

    log(f"[{name}] loading {spec}")
    loaded = load_for_inference(spec, dtype=dtype, prompt_style=prompt_style, trust_remote_code=trust_remote_code)
    log(f"[{name}] {loaded.description}; prompt style {loaded.prompt_style}, {loaded.dtype}, "
        f"loaded in {loaded.info['load_seconds']:.1f} s")
    try:
        start = time.time()
        outputs = generate(loaded, prompts.messages, **settings,
                           progress=lambda done, total: log(f"[{name}] generated {done}/{total}"))
        seconds = time.time() - start
        record = loaded.summary()
    finally:
        release(loaded)
    metrics = summarize(outputs, prompts.references, adherence_regex=adherence_regex)
    tokens = sum(len(o["token_ids"]) + (1 if o["stopped"] else 0) for o in outputs)
    record.update(name=name, spec=spec, generate_seconds=round(seconds, 2), generated_tokens=tokens,
                  tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else None)
    log(f"[{name}] {len(outputs)} answers, {tokens} tokens in {seconds:.1f} s ({record['tokens_per_second']} tokens/s)")
    return record, outputs, metrics


def reward_scores(spec_or_model, conversations: list[list[dict]], answers: list[str]) -> list[float]:
    """Score each answer with a reward model (a `stage: reward` run directory or a sequence-classification
    folder with one output, or such a (model, tokenizer) already loaded): the prompt turns plus the answer,
    rendered with the reward model's chat template, exactly as GRPO/RLOO score completions (finetune.rewards)."""
    from finetune import rewards

    model, tokenizer = rewards.load_reward_model(spec_or_model) if isinstance(spec_or_model, str) else spec_or_model
    texts = [[*messages, {"role": "assistant", "content": answer}] for messages, answer in zip(conversations, answers)]
    return rewards.score(model, tokenizer, texts)


def check_regex(pattern: str | None) -> None:
    if pattern is not None:
        from finetune.metrics import summarize

        summarize([], adherence_regex=pattern)  # validates the pattern now, before any model is loaded


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", action="append", metavar="NAME=SPEC", required=True,
                        help="a model to compare (repeat): NAME=embedded:smollm2-135m, NAME=RUN_DIR, NAME=MODEL_FOLDER "
                             "or NAME=HUB_ID")
    parser.add_argument("--prompts", required=True, metavar="DATA",
                        help="a datasets_cfg name (e.g. json_extract), a dataset YAML or data file, or a .jsonl "
                             "prompt file (rows with `prompt` or `messages`, optional `reference`)")
    parser.add_argument("--split", default=None, help="dataset split (default: heldout, else the only split)")
    parser.add_argument("--max-prompts", type=int, default=None, metavar="N", help="use the first N prompts")
    parser.add_argument("--prompt-style", action="append", metavar="NAME=STYLE", default=[],
                        help=f"how a model's prompts are written ({', '.join(PROMPT_STYLES)}); default chat when "
                             "the tokenizer has a chat template, else raw")
    parser.add_argument("--adherence-regex", default=None, metavar="RE",
                        help="what a well-formed answer looks like (whole answer); default: the dataset's")
    parser.add_argument("--out", default=None, metavar="DIR", help="report folder (default runs/compare-TIME)")
    parser.add_argument("--reward-model", default=None, metavar="SPEC",
                        help="also score every answer with this reward model (a `stage: reward` run directory, or "
                             "a folder or hub id of a sequence-classification model with one output); reported as "
                             "the mean reward")
    add_model_arguments(parser)
    add_decoding_arguments(parser)


def run(args) -> dict:
    """The verb, with library chatter quieted and put back as it was on return."""
    from finetune.generate import quiet_libraries

    with quiet_libraries():
        return _run(args)


def _run(args) -> dict:
    from finetune.files import write_json
    from finetune.generate import apply_threads, check_decoding, check_spec, settings_for_report
    from finetune.report import format_table, write_report

    models = parse_pairs(args.model, "--model", "base=embedded:smollm2-135m")
    styles = parse_pairs(args.prompt_style, "--prompt-style", "base=completion")
    for name, style in styles.items():
        if name not in models:
            raise FinetuneError(f"--prompt-style {name}={style}: no model is named {name!r} ({', '.join(models)})")
        if style not in PROMPT_STYLES:
            raise FinetuneError(f"--prompt-style {name}={style}: allowed styles: {', '.join(PROMPT_STYLES)}")
    for spec in models.values():
        check_spec(spec)
    settings = decoding_settings(args)
    check_decoding(**settings)
    prompts = load_prompts(args.prompts, args.split, args.max_prompts)
    regex = args.adherence_regex if args.adherence_regex is not None else prompts.adherence_regex
    check_regex(regex)
    out_dir = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    if out_dir.exists() and not out_dir.is_dir():
        raise FinetuneError(f"--out {out_dir} is a file; give a folder for the report")
    if args.reward_model:
        from finetune.rewards import check_source

        check_source(args.reward_model)  # a missing or unfinished run, or a causal LM, fails now, not after generation
    apply_threads(args)
    log(f"{len(prompts.items)} prompts from {prompts.source}" + (f" (split {prompts.split})" if prompts.split else ""))

    started = time.time()
    records, outputs, metrics = [], {}, {}
    for name, spec in models.items():
        record, outputs[name], metrics[name] = score_model(name, spec, prompts, settings, regex, args.dtype,
                                                           styles.get(name), args.trust_remote_code)
        records.append(record)
    if args.reward_model:
        from finetune import rewards as rewards_lib
        from finetune.metrics import summarize

        reward_model = rewards_lib.load_reward_model(args.reward_model, trust_remote_code=args.trust_remote_code)
        for name in models:
            log(f"[{name}] scoring answers with reward model {args.reward_model}")
            rewards = reward_scores(reward_model, prompts.messages, [o["text"] for o in outputs[name]])
            for output, reward in zip(outputs[name], rewards):
                output["reward"] = reward
            metrics[name] = summarize(outputs[name], prompts.references, adherence_regex=regex, rewards=rewards)
    report_settings = {
        "prompts": prompts.source, "split": prompts.split, "n_prompts": len(prompts.items),
        **settings_for_report(settings), "dtype": args.dtype,
        "prompt_style": ", ".join(f"{r['name']}={r['prompt_style']}" for r in records),
        "adherence_regex": regex,
        "reward_model": args.reward_model,
    }
    paths = write_report(
        out_dir,
        models=[{"name": r["name"], "source": r["source"], "description": r["description"]} for r in records],
        prompts=[{"prompt": item["prompt"], "reference": item["reference"]} for item in prompts.items],
        outputs=outputs,
        metrics=metrics,
        settings=report_settings,
    )
    write_json(out_dir / "compare.json", {
        "settings": report_settings,
        "models": records,
        "metrics": metrics,
        "seconds": round(time.time() - started, 1),
        "files": {kind: p.name for kind, p in paths.items()},
    })
    print(format_table(metrics))
    print(f"\nReport: {paths['html']}  (also {paths['md'].name}, {paths['jsonl'].name}, compare.json in {out_dir})")
    return {"out": out_dir, "metrics": metrics, "models": records, "report": paths["html"]}


def compare(models: dict[str, str], prompts: str, split: str | None = None, max_prompts: int | None = None,
            out: str | None = None, reward_model: str | None = None, dtype: str = "auto",
            trust_remote_code: bool = False, **decoding) -> dict:
    """Python API (finetune.compare(...)): {name: spec} models answer the same prompts, as the command does
    (decoding: max_new_tokens=, decoding=, temperature=, top_k=, top_p=, num_beams=, seed=, batch_size=).
    Returns {"out", "metrics" (name -> metric -> value), "models", "report" (the HTML file)}."""
    argv = [a for name, spec in models.items() for a in ("--model", f"{name}={spec}")]
    argv += ["--prompts", str(prompts), "--dtype", dtype, *(["--trust-remote-code"] if trust_remote_code else [])]
    flags = [("--split", split), ("--max-prompts", max_prompts), ("--out", out), ("--reward-model", reward_model),
             *((f"--{key.replace('_', '-')}", value) for key, value in decoding.items())]
    for flag, value in flags:
        if value is not None:
            argv += [flag, str(value)]
    parser = argparse.ArgumentParser(prog="finetune.compare", exit_on_error=False)
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise FinetuneError(f"finetune.compare: {e}") from None
    return run(args)


from finetune.api import make_callable  # noqa: E402

make_callable(__name__)
