"""Datasets: the datasets_cfg/ registry, row checks, conversion to chat messages, tokenization with loss
masks, train/held-out overlap, and a cache keyed by content, tokenizer and template.

Each stage reads rows in its own shape over the same sources and row rules (`ROW_SHAPES`):
plain-text documents (pretrain: `format: text`, from .jsonl/.json/.csv/.parquet rows or .txt files),
conversations (sft), preference pairs (reward, dpo: `format: preference`), unpaired examples (kto:
`format: unpaired_preference`) and prompts with a reference answer (grpo, rloo: any chat format, the last
assistant turn being the reference).

A dataset YAML (`datasets_cfg/NAME.yaml`) names its files per split (or a hub id), its format and its
column names. Every row is checked before training: strict mode stops at the first malformed row with the
file, row and reason; lenient mode skips malformed rows, counts them per reason, and fails when more than
`data.max_drop_fraction` of them are dropped. Rows whose supervised tokens would all be cut off by
`max_length` are counted and dropped (TRL keeps them when packing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finetune import templates as templates_lib
from finetune.errors import FinetuneError, shown
from finetune.files import file_lock, home_dir, staged_dir, work_dir, write_json
from finetune.recipe import build_section, field_spec, read_yaml_mapping

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "unpaired_preference")
CHAT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "txt"}
# In a .txt file, a line holding only this separates documents (a file without one is one document).
TXT_SEPARATOR = "<|endoftext|>"
ROLES = ("system", "user", "assistant", "tool")
# Keys a message may carry besides role and content: tool calls (assistant) and tool results' ids/names (tool).
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Bumped when tokenization or checks change, so old cache entries are not reused.
CACHE_VERSION = 2


def datasets_dir() -> Path:
    """datasets_cfg/: $FINETUNE_DATASETS, else the repository's, else ./datasets_cfg."""
    if os.environ.get("FINETUNE_DATASETS"):
        return Path(os.environ["FINETUNE_DATASETS"])
    repo = Path(__file__).resolve().parents[1] / "datasets_cfg"
    return repo if repo.is_dir() else Path("datasets_cfg")


@dataclass
class DatasetSpec:
    description: str = field_spec("", "What the data is and what it teaches.")
    license: str = field_spec("", "License of the data.")
    files: dict[str, str] = field_spec({}, "Split name -> data file (relative to this YAML) for local data.")
    hub: str | None = field_spec(None, "Hub dataset id, read with datasets.load_dataset (needs network).")
    hub_splits: dict[str, str] = field_spec({}, "Our split name -> the hub dataset's split name.")
    revision: str | None = field_spec(None, "Hub dataset revision (a commit sha or tag): pins the data, and is part "
                                            "of the processed-data cache key.")
    type: str | None = field_spec(None, "File type; inferred from the extension.",
                                  (None, "jsonl", "json", "csv", "parquet", "txt"))
    format: str = field_spec("messages", "Row format.", FORMATS)
    columns: dict[str, str] = field_spec({}, "Standard field -> column name, e.g. {messages: conversations}.")
    max_rows: int | None = field_spec(None, "Read at most this many rows per split.", minimum=1)
    adherence_regex: str | None = field_spec(None, "What a well-formed answer looks like (used when scoring outputs).")
    source: str = field(default="", metadata={"internal": True})


def load_spec(name: str) -> DatasetSpec:
    """Resolve a recipe's dataset name: a datasets_cfg/ name, a dataset YAML path, or a data file."""
    path = Path(name).expanduser()
    if path.suffix in FILE_TYPES:
        if not path.is_file():
            raise FinetuneError(f"dataset file {name} not found")
        spec = DatasetSpec(files={"train": str(path.resolve())}, format=_guess_format(path), source=str(path))
        return spec
    if path.suffix and path.is_file() and path.suffix not in (".yaml", ".yml"):
        raise FinetuneError(f"dataset file {name}: files ending {path.suffix} are not read; data files end "
                            f"{', '.join(FILE_TYPES)} (rename a plain-text corpus to .txt), or describe it in a "
                            "dataset YAML with `type`")
    if path.suffix not in (".yaml", ".yml"):
        path = datasets_dir() / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in datasets_dir().glob("*.yaml"))
            raise FinetuneError(f"dataset '{name}' not found: no {path}; known datasets: {', '.join(known) or 'none'}")
    data = read_yaml_mapping(path, "a dataset YAML is a mapping (files, format, columns, ...)")
    spec = build_section(DatasetSpec, data, "", str(path))
    spec.source = str(path)
    spec.files = {split: str((path.parent / f).resolve()) for split, f in spec.files.items()}
    if not spec.files and not spec.hub:
        raise FinetuneError(f"{path}: give `files` (split -> file) or `hub` (a hub dataset id)")
    return spec


def _guess_format(path: Path) -> str:
    """For a bare data file: the format its first row's keys suggest (a .txt file is text)."""
    if path.suffix == ".txt":
        return "text"
    try:
        if path.suffix == ".jsonl":
            # The first row as training reads it (row numbers, a byte-order mark, non-UTF-8 bytes alike).
            lineno, row = next(iter_rows(DatasetSpec(files={"train": str(path)}, source=str(path)), "train"),
                               (None, None))
            if lineno is None:
                raise FinetuneError(f"{path}: the file is empty; it needs at least one row")
            if isinstance(row, RowError):
                raise FinetuneError(f"{path}: row {lineno}: {row}; fix the row (its keys tell the format)")
            if not isinstance(row, dict):
                raise FinetuneError(f"{path}: row {lineno} is not a JSON object; each line must be one")
            keys = set(row)
        else:
            import datasets

            keys = set(datasets.load_dataset(FILE_TYPES[path.suffix], data_files=str(path),
                                             split="train[:1]").column_names)
    except (StopIteration, ValueError) as e:
        raise FinetuneError(f"{path}: cannot read its first row to tell the format: {e}") from None
    for fmt, need in [
        ("messages", {"messages"}), ("sharegpt", {"conversations"}), ("preference", {"chosen", "rejected"}),
        ("unpaired_preference", {"completion", "label"}),
        ("alpaca", {"instruction", "output"}), ("prompt_completion", {"prompt", "completion"}), ("text", {"text"}),
    ]:
        if need <= keys:
            return fmt
    raise FinetuneError(
        f"{path}: cannot tell the format from the columns {sorted(keys)}; write a dataset YAML with "
        "`format` and `columns`"
    )


# ----------------------------------------------------------------------------- reading rows


def read_rows(spec: DatasetSpec, split: str, max_rows: int | None = None) -> tuple[list, str]:
    """Raw rows of one split as (row number, dict-or-error) pairs, and a content hash."""
    digest = split_digest(spec, split)
    return list(iter_rows(spec, split, max_rows)), digest


def split_digest(spec: DatasetSpec, split: str) -> str:
    """A content hash of one split: the file's sha256 (read in chunks), or the hub id, split and revision."""
    if spec.hub:
        return hashlib.sha256(f"{spec.hub}:{spec.hub_splits.get(split, split)}:{spec.revision}".encode()).hexdigest()
    path = _split_file(spec, split)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_file(spec: DatasetSpec, split: str) -> Path:
    if split not in spec.files:
        raise FinetuneError(f"{spec.source}: no split '{split}'; splits: {', '.join(spec.files)}")
    path = Path(spec.files[split])
    if not path.is_file():
        raise FinetuneError(f"{spec.source}: data file {path} for split '{split}' not found")
    return path


def iter_rows(spec: DatasetSpec, split: str, max_rows: int | None = None):
    """Raw rows of one split as (row number, dict-or-error) pairs, one at a time: a file is read as it goes (or
    memory-mapped by datasets), never held whole."""
    limit = min(x for x in (max_rows, spec.max_rows, 10**12) if x)
    if spec.hub:
        import datasets

        hub_split = spec.hub_splits.get(split, split)
        ds = datasets.load_dataset(spec.hub, split=hub_split, revision=spec.revision,
                                   cache_dir=str(home_dir() / "hf-datasets"))
        for i in range(min(limit, len(ds))):
            yield i + 1, ds[i]
        return
    path = _split_file(spec, split)
    file_type = spec.type or FILE_TYPES.get(path.suffix)
    if file_type is None:
        raise FinetuneError(f"{spec.source}: cannot tell the type of {path}; set `type` (jsonl, json, csv, parquet, "
                            "txt)")
    if file_type == "txt":
        yield from _txt_documents(path)[:limit]
    elif file_type == "jsonl":
        # Read line by line so a broken line is reported with its number (datasets' loader would not say).
        count = 0
        with open(path, "rb") as f:
            for lineno, raw_line in enumerate(f, 1):
                if count >= limit:
                    break
                try:
                    line = raw_line.decode("utf-8")
                except UnicodeDecodeError as e:
                    count += 1
                    yield lineno, RowError(f"not UTF-8 text (byte {e.start})")
                    continue
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors save UTF-8
                if not line.strip():
                    continue
                count += 1
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, RowError(f"unparsable JSON ({e.msg})")
    else:
        import datasets

        try:
            ds = datasets.load_dataset(file_type, data_files=str(path), split="train",
                                       cache_dir=str(home_dir() / "hf-datasets"))
        except Exception as e:  # datasets raises many types for a bad file
            raise FinetuneError(f"{path}: cannot read as {file_type}: {e}") from None
        # Row numbers as a person counts them: csv has a header line, others start at 1.
        offset = 2 if file_type == "csv" else 1
        for i in range(min(limit, len(ds))):
            yield i + offset, ds[i]


def _txt_documents(path: Path) -> list:
    """The documents of a .txt file, as (line number, {"text": ...}) rows; a file that is not text is refused."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise FinetuneError(f"{path}: not a text file (it holds NUL bytes at byte {raw.index(0)}); a corpus file "
                            "is UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not a text file (byte {e.start} is not UTF-8); a corpus file is UTF-8 "
                            "text: convert it (e.g. iconv -t UTF-8) or remove it") from None
    rows, lines, start = [], [], 1
    for lineno, line in enumerate([*text.splitlines(), TXT_SEPARATOR], 1):
        if line.strip() == TXT_SEPARATOR:
            if "".join(lines).strip():
                rows.append((start, {"text": "\n".join(lines).strip("\n")}))
            lines, start = [], lineno + 1
        else:
            lines.append(line)
    return rows


class RowError(str):
    """Why a row is malformed (a short reason, counted in lenient mode)."""


def _col(spec: DatasetSpec, std: str) -> str:
    return spec.columns.get(std, std)


def _check_tool_calls(i: int, calls) -> str | None:
    if not isinstance(calls, list) or not calls:
        return f"message {i} tool_calls is not a non-empty list"
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return f"message {i} has a tool call without function.name"
        if not isinstance(function.get("arguments", {}), (dict, str)):
            return f"message {i} tool call {shown(function['name'])} has arguments that are neither an object nor text"
    return None


def check_messages(messages) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages is not a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {i} lacks role or content"
        if m["role"] not in ROLES:
            return f"unknown role {shown(m['role'])} (allowed: {', '.join(ROLES)})"
        calls = m.get("tool_calls")
        if calls is not None and m["role"] != "assistant":
            return f"message {i} has tool_calls but is a {m['role']} message (only assistant turns call tools)"
        if calls is not None and (problem := _check_tool_calls(i, calls)):
            return problem
        if not isinstance(m["content"], str) and not (calls and m["content"] is None):
            return f"message {i} content is {type(m['content']).__name__}, not text"
        if m["role"] == "system" and i != 0:
            return "system message not first"
        if m["role"] == "assistant" and not (m["content"] or "").strip() and not calls:
            return "empty assistant turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    if messages[-1]["role"] != "assistant":
        return "conversation does not end with an assistant turn"
    return None


def to_messages(spec: DatasetSpec, row) -> list[dict] | str:
    """Convert one row to chat messages (or to text for `text`), or return a RowError."""
    if isinstance(row, RowError):
        return row
    if not isinstance(row, dict):
        return RowError("row is not an object")
    fmt = spec.format
    try:
        if fmt == "text":
            text = row[_col(spec, "text")]
            if not isinstance(text, str) or not text.strip():
                return RowError("empty or non-text 'text'")
            return text
        if fmt == "messages":
            messages = row[_col(spec, "messages")]
            if not isinstance(messages, list) or not messages:
                return RowError(f"'{_col(spec, 'messages')}' is not a non-empty list of messages")
            messages = _normalised(messages)
        elif fmt == "sharegpt":
            messages, turns = [], row[_col(spec, "conversations")]
            if not isinstance(turns, list) or not turns:
                return RowError(f"'{_col(spec, 'conversations')}' is not a non-empty list of turns")
            for turn in turns:
                if not isinstance(turn, dict):
                    return RowError("conversation turn is not an object")
                who = turn.get("from")
                if who not in SHAREGPT_ROLES:
                    return RowError(f"unknown role {shown(who)} (allowed: {', '.join(SHAREGPT_ROLES)})")
                messages.append({"role": SHAREGPT_ROLES[who], "content": turn.get("value")})
        elif fmt == "alpaca":
            instruction, extra = row[_col(spec, "instruction")], row.get(_col(spec, "input")) or ""
            if not isinstance(instruction, str) or not isinstance(extra, str):
                return RowError("instruction/input is not text")
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": prompt},
                        {"role": "assistant", "content": row[_col(spec, "output")]}]
            if row.get("system"):
                messages.insert(0, {"role": "system", "content": row["system"]})
        elif fmt == "prompt_completion":
            prompt, completion = row[_col(spec, "prompt")], row[_col(spec, "completion")]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            completion = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else completion
            if not isinstance(prompt, list) or not isinstance(completion, list):
                return RowError("prompt/completion is neither text nor a list of messages")
            messages = _normalised(prompt + completion)
        else:
            return RowError(f"format '{fmt}' holds preference pairs; it is for the dpo/reward stages, not sft")
    except KeyError as e:
        return RowError(f"missing field {e}")
    except ValueError as e:  # a tool call's arguments given as text that is not JSON
        return RowError(str(e))
    problem = check_messages(messages)
    if problem is None and _has_surrogates(messages):
        problem = "text holds an unpaired UTF-16 surrogate (e.g. an escape like \\ud83d alone); fix the encoding"
    return RowError(problem) if problem else messages


def _normalised(messages: list) -> list:
    """role, content and the tool keys of each message; an assistant turn that only calls tools gets content "",
    and tool-call arguments given as JSON text are parsed (chat templates expect an object)."""
    out = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        message = {"role": m.get("role"),
                   "content": "" if m.get("content") is None and m.get("tool_calls") else m.get("content"),
                   **{k: m[k] for k in MESSAGE_EXTRAS if m.get(k) is not None}}
        if isinstance(message.get("tool_calls"), list):
            message["tool_calls"] = [_parsed_arguments(call) for call in message["tool_calls"]]
        out.append(message)
    return out


def _parsed_arguments(call):
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError as e:
        name = function.get("name")
        raise ValueError(f"tool call {shown(name)} has arguments that are not valid JSON ({e.msg})") from None
    return {**call, "function": {**function, "arguments": arguments}}


def _has_surrogates(messages: list) -> bool:
    try:
        json.dumps(messages, ensure_ascii=False).encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _as_turns(value, role: str, what: str) -> list[dict] | RowError:
    """A field given as text or as a list of messages, as a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}] if value.strip() else RowError(f"empty {what}")
    if not isinstance(value, list) or not value:
        return RowError(f"{what} is neither text nor a non-empty list of messages")
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            return RowError(f"{what} holds a message without a known role and text content")
    if not "".join(m["content"] for m in value).strip():
        return RowError(f"empty {what}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt_of(spec: DatasetSpec, row) -> list[dict] | RowError:
    """The prompt turns of a preference or unpaired row (the row itself checked first)."""
    if isinstance(row, RowError):
        return row
    if not isinstance(row, dict):
        return RowError("row is not an object")
    prompt = row.get(_col(spec, "prompt"))
    if prompt is None or prompt == [] or (isinstance(prompt, str) and not prompt.strip()):
        return RowError("no prompt")
    turns = _as_turns(prompt, "user", "prompt")
    if not isinstance(turns, RowError) and turns[-1]["role"] == "assistant":
        return RowError("prompt ends with an assistant turn")
    return turns


def to_preference(spec: DatasetSpec, row) -> dict | RowError:
    """A preference row as TRL's conversational pair: prompt, chosen and rejected message lists, plus its kind
    (the `rejection_type` column where there is one, for per-type accuracy)."""
    prompt = _prompt_of(spec, row)
    if isinstance(prompt, RowError):
        return prompt
    pair = {"prompt": prompt}
    for side in ("chosen", "rejected"):
        if _col(spec, side) not in row:
            return RowError(f"missing field '{_col(spec, side)}'")
        turns = _as_turns(row[_col(spec, side)], "assistant", side)
        if isinstance(turns, RowError):
            return turns
        if turns[0]["role"] != "assistant":
            return RowError(f"{side} does not start with an assistant turn")
        pair[side] = turns
    if pair["chosen"] == pair["rejected"]:
        return RowError("chosen == rejected")
    pair["kind"] = str(row.get(_col(spec, "rejection_type")) or "")
    return pair


def to_unpaired(spec: DatasetSpec, row) -> dict | RowError:
    """An unpaired row (KTO): prompt, one completion, and whether it is desirable (label true/false)."""
    prompt = _prompt_of(spec, row)
    if isinstance(prompt, RowError):
        return prompt
    if _col(spec, "completion") not in row:
        return RowError(f"missing field '{_col(spec, 'completion')}'")
    completion = _as_turns(row[_col(spec, "completion")], "assistant", "completion")
    if isinstance(completion, RowError):
        return completion
    label = row.get(_col(spec, "label"))
    if not isinstance(label, bool):
        return RowError(f"label is {shown(label)}, not true or false")
    return {"prompt": prompt, "completion": completion, "label": label,
            "kind": str(row.get(_col(spec, "rejection_type")) or "")}


def to_prompt(spec: DatasetSpec, row) -> dict | RowError:
    """A prompt for online RL (grpo, rloo): everything before the last assistant turn of a chat row, with that
    turn as the reference answer that rule rewards compare against, and the dataset's adherence_regex."""
    messages = to_messages(spec, row)
    if isinstance(messages, RowError):
        return messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if last == 0:
        return RowError("no prompt before the assistant turn")
    return {"prompt": messages[:last], "reference": messages[last]["content"], "pattern": spec.adherence_regex or ""}


def conversations_of(spec: DatasetSpec, row) -> list[list[dict]]:
    """Whole conversations in a row of any chat or preference format (none for a malformed row or plain text):
    a chat row itself; prompt + chosen and prompt + rejected of a pair; prompt + completion of an unpaired row."""
    if spec.format == "preference":
        pair = to_preference(spec, row)
        return [] if isinstance(pair, RowError) else [pair["prompt"] + pair["chosen"],
                                                      pair["prompt"] + pair["rejected"]]
    if spec.format == "unpaired_preference":
        example = to_unpaired(spec, row)
        return [] if isinstance(example, RowError) else [example["prompt"] + example["completion"]]
    messages = to_messages(spec, row)
    return [messages] if isinstance(messages, list) else []


def to_text(spec: DatasetSpec, row) -> str | RowError:
    """A plain-text document (pretraining)."""
    return to_messages(spec, row)


# What each row shape is made from: stage data shape -> (formats it accepts, converter, what the stage needs).
ROW_SHAPES = {
    "text": (("text",), to_text, "plain-text documents (format: text, a `text` column or .txt files)"),
    "conversation": (CHAT_FORMATS + ("text",), to_messages, "conversations (messages, sharegpt, alpaca, "
                                                            "prompt_completion or text)"),
    "preference": (("preference",), to_preference, "preference pairs (format: preference, with prompt, chosen, "
                                                   "rejected)"),
    "unpaired": (("unpaired_preference",), to_unpaired, "unpaired examples (format: unpaired_preference, with "
                                                       "prompt, completion, label)"),
    "prompt": (CHAT_FORMATS, to_prompt, "chat rows whose last assistant turn is the reference answer (messages, "
                                        "sharegpt, alpaca or prompt_completion)"),
}


# ----------------------------------------------------------------------------- tokenization


def tokenize(example, tokenizer, chat, max_length: int, assistant_only_loss: bool) -> dict | RowError:
    """input_ids and labels (-100 where no loss) for one conversation or text, cut to max_length; a RowError where
    the template cannot mask this conversation or drops its tool calls."""
    if isinstance(example, str):  # plain text: every token is trained, EOS appended so documents end
        ids = tokenizer(example, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        try:
            problem = _tool_calls_dropped(example, tokenizer, chat.training)
            if problem:
                return RowError(problem)
            if assistant_only_loss:
                ids, mask = templates_lib.masked(tokenizer, chat, example)
                labels = [t if m else -100 for t, m in zip(ids, mask)]
            else:
                out = tokenizer.apply_chat_template(example, chat_template=chat.training, tokenize=True,
                                                    return_dict=True)
                ids = list(out["input_ids"])
                labels = list(ids)
        except templates_lib.NotPrefix as e:
            return RowError(f"{e}; set data.chat_template to a template with {{% generation %}} markers")
        except FinetuneError:
            raise
        except Exception as e:  # noqa: BLE001 - a template refuses a conversation with whatever it raises
            return RowError(f"the chat template cannot render this conversation ({type(e).__name__}: {str(e)[:200]})")
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "full_length": len(ids)}


def _tool_calls_dropped(messages, tokenizer, template: str) -> str | None:
    """A template that does not render tool calls would train the model on an empty answer: refuse the row."""
    if not any(m.get("tool_calls") for m in messages):
        return None
    render = lambda msgs: tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False)  # noqa: E731
    without = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
    if render(messages) == render(without):
        return ("the chat template does not render tool calls (the conversation renders the same without them); "
                "set data.chat_template to a template that supports tools")
    return None


# ----------------------------------------------------------------------------- overlap


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def prompt_text(example) -> str:
    """The prompt side of a row: every message before the last assistant turn."""
    if isinstance(example, str):
        return example
    last = max(i for i, m in enumerate(example) if m["role"] == "assistant")
    return "\n".join(m["content"] or "" for m in example[:last])


def _shingles(text: str, n: int = 5) -> set:
    text = _norm(text)
    return {text[i : i + n] for i in range(max(1, len(text) - n + 1))}


_MINHASH_BANDS, _MINHASH_ROWS = 16, 4  # a pair at Jaccard 0.8 shares a band with probability 1 - (1 - 0.8**4)**16
_MERSENNE = (1 << 31) - 1  # a * x + b stays below 2**63 for a, b, x < 2**31


def _minhash_bands(shingles: set, a, b) -> list[bytes]:
    """The MinHash signature of a set of 5-grams (crc32 of each, permuted as (a*x + b) mod 2**31-1), cut into
    bands; two sets that share a band are candidates."""
    import numpy as np

    x = np.fromiter((zlib.crc32(s.encode()) % _MERSENNE for s in shingles), dtype=np.uint64, count=len(shingles))
    signature = ((np.outer(x, a) + b) % _MERSENNE).min(axis=0)
    return [signature[i * _MINHASH_ROWS:(i + 1) * _MINHASH_ROWS].tobytes() + bytes([i])
            for i in range(_MINHASH_BANDS)]


def find_overlap(train_prompts, eval_prompts: list[str], threshold: float = 0.8) -> dict:
    """Held-out prompts that also appear in training: exactly (after normalising case and spaces), or
    nearly (Jaccard similarity of character 5-grams >= threshold). Near candidates come from MinHash bands
    (16 bands of 4 hashes: a pair at Jaccard 0.8 is a candidate with probability 0.9998, at 0.9 with
    probability 1 - 4e-8), and every candidate is checked exactly. The held-out prompts are indexed; the
    training prompts (any iterable) stream past, so memory follows the held-out set only."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.integers(1, _MERSENNE, _MINHASH_BANDS * _MINHASH_ROWS, dtype=np.uint64)
    b = rng.integers(0, _MERSENNE, _MINHASH_BANDS * _MINHASH_ROWS, dtype=np.uint64)
    eval_norm: dict[str, list[int]] = {}
    for i, p in enumerate(eval_prompts):
        eval_norm.setdefault(_norm(p), []).append(i)
    eval_sets = [_shingles(p) for p in eval_prompts]
    index: dict[bytes, list[int]] = {}
    for i, shingles in enumerate(eval_sets):
        for band in _minhash_bands(shingles, a, b):
            index.setdefault(band, []).append(i)
    exact: set[int] = set()
    near: set[int] = set()
    for p in train_prompts:
        if len(exact) + len(near) == len(eval_prompts):
            break
        same = eval_norm.get(_norm(p))
        if same:
            exact.update(same)
            near.difference_update(same)
        mine = _shingles(p)
        candidates = {i for band in _minhash_bands(mine, a, b) for i in index.get(band, ())} - exact - near
        for i in candidates:
            shared = len(mine & eval_sets[i])
            if shared / (len(mine) + len(eval_sets[i]) - shared) >= threshold:
                near.add(i)
    flagged = sorted(exact) + sorted(near)
    return {"exact": len(exact), "near": len(near), "examples": [eval_prompts[i][:120] for i in flagged[:3]]}


# ----------------------------------------------------------------------------- preparation


@dataclass
class Prepared:
    train: object  # datasets.Dataset with input_ids, labels
    eval: object | None
    stats: dict
    hashes: dict  # dataset file -> sha256
    first_example: object  # the first training conversation, for `validate`


def _spec_for(ref, shape: str, stage: str) -> DatasetSpec:
    spec = load_spec(ref.name)
    formats, _, needs = ROW_SHAPES[shape]
    if spec.format not in formats:
        raise FinetuneError(
            f"{spec.source}: format {spec.format} does not fit stage {stage}, which trains on {needs}; pick a "
            "dataset of that format (see datasets_cfg/) or another stage"
        )
    return spec


def _where(spec: DatasetSpec, ref) -> str:
    """What an error about one recipe dataset entry names: its file, else the hub id, else the dataset YAML."""
    return spec.files.get(ref.split, spec.hub or spec.source)


def iter_checked(spec: DatasetSpec, ref, data_cfg, shape: str, reasons: Counter, counts: Counter):
    """Rows of one recipe dataset entry, read, converted to the stage's row shape and checked, one at a time, as
    (row number, converted row). Strict mode raises at the first bad row (file and row named); lenient mode counts
    it in `reasons`. counts["read"] ends as the number of rows read."""
    _, convert, _ = ROW_SHAPES[shape]
    where = _where(spec, ref)
    for rowno, row in iter_rows(spec, ref.split, ref.max_rows):
        counts["read"] += 1
        converted = convert(spec, row)
        if isinstance(converted, RowError):
            if data_cfg.strict:
                raise FinetuneError(
                    f"{where}: row {rowno}: {converted}. Fix the row, or set data.strict: false to skip bad rows"
                )
            reasons[str(converted)] += 1
            continue
        if isinstance(converted, str) and data_cfg.assistant_only_loss and shape == "conversation":
            raise FinetuneError(
                f"{spec.source}: format text has no assistant turns; set data.assistant_only_loss: false to train on it"
            )
        yield rowno, converted
    if not counts["read"]:
        what = "the corpus is empty: no document" if shape == "text" else "no rows"
        raise FinetuneError(f"{where}: {what} in split '{ref.split}' (an empty file?); it needs at least one")


def _check_drop_fraction(spec: DatasetSpec, ref, data_cfg, reasons: Counter, rows_read: int) -> None:
    dropped = sum(reasons.values())
    if rows_read and dropped / rows_read > data_cfg.max_drop_fraction:
        where = _where(spec, ref)
        detail = ", ".join(f"{n} x {r}" for r, n in reasons.most_common())
        raise FinetuneError(
            f"{where}: {dropped} of {rows_read} rows are malformed ({detail}), more than "
            f"data.max_drop_fraction = {data_cfg.max_drop_fraction}; fix the data or raise the limit"
        )


def _weighted_order(ref, kept: int, seed: int) -> list[int] | None:
    """Mixture weight: round(weight * rows) rows, repeating the whole set when the weight is above 1 (None: all
    rows, in order)."""
    if ref.weight == 1:
        return None
    rng = random.Random(seed)
    target = round(ref.weight * kept)
    order = list(range(kept))
    rng.shuffle(order)
    return (order * (target // max(1, kept) + 1))[:target]


def read_checked(ref, data_cfg, seed: int, shape: str = "conversation", stage: str = "sft"):
    """Rows of one recipe dataset entry: read, converted to the stage's row shape, checked (strict or lenient),
    weighted. Returns (rows, reasons for dropped rows, rows read, {file: sha256})."""
    spec = _spec_for(ref, shape, stage)
    reasons, counts = Counter(), Counter()
    kept = [converted for _, converted in iter_checked(spec, ref, data_cfg, shape, reasons, counts)]
    _check_drop_fraction(spec, ref, data_cfg, reasons, counts["read"])
    order = _weighted_order(ref, len(kept), seed)
    picked = kept if order is None else [kept[i] for i in order]
    where = _where(spec, ref)
    return picked, reasons, counts["read"], {where: split_digest(spec, ref.split)}


MAP_BATCH = 256  # conversations tokenized per batch (and written per Arrow batch): what bounds memory
PARALLEL_ROWS = 4000  # below this many rows one process tokenizes: starting workers would cost more


def _tokenize_batch(batch, tokenizer, chat, max_length: int, assistant_only_loss: bool) -> dict:
    out = {"input_ids": [], "labels": [], "full_length": [], "trained": [], "problem": [], "refused": [],
           "prompt": []}
    for text in batch["example"]:
        example = json.loads(text)
        tok = tokenize(example, tokenizer, chat, max_length, assistant_only_loss)
        refused = isinstance(tok, RowError)
        if refused:
            ids, labels, full, trained, problem = [], [], 0, 0, str(tok)
        else:
            ids, labels, full = tok["input_ids"], tok["labels"], tok["full_length"]
            trained = sum(1 for x in labels if x != -100)
            problem = "" if trained else ("answer truncated away by max_length" if full > max_length
                                          else "no trained tokens (template marks no answer)")
        for key, value in (("input_ids", ids), ("labels", labels), ("full_length", full), ("trained", trained),
                           ("problem", problem), ("refused", refused), ("prompt", prompt_text(example))):
            out[key].append(value)
    return out


def _num_proc(data_cfg, rows: int) -> int | None:
    if data_cfg.num_proc is not None:
        return data_cfg.num_proc if data_cfg.num_proc > 1 else None
    return min(os.cpu_count() or 1, 8) if rows >= PARALLEL_ROWS and (os.cpu_count() or 1) > 1 else None


def _load_split(ref, tokenizer, templates, data_cfg, seed: int, work: Path):
    """Rows of one recipe dataset entry: checked and converted as they are read (written to Arrow files under
    `work`, never all held in memory), weighted, then tokenized by datasets.map (in parallel for large sets,
    with a progress bar). Returns the tokenized dataset (input_ids, labels, prompt), its counts, its hash and
    its first conversation."""
    import datasets

    spec = _spec_for(ref, "conversation", "sft")
    reasons, counts, first = Counter(), Counter(), []

    def rows():
        for rowno, converted in iter_checked(spec, ref, data_cfg, "conversation", reasons, counts):
            if not first:
                first.append(converted)
            yield {"example": json.dumps(converted, ensure_ascii=False), "row": rowno}

    features = datasets.Features({"example": datasets.Value("string"), "row": datasets.Value("int64")})
    work.mkdir(parents=True, exist_ok=True)
    try:
        ds = datasets.Dataset.from_generator(rows, features=features, cache_dir=str(work),
                                             fingerprint=uuid.uuid4().hex)
    except datasets.exceptions.DatasetGenerationError as e:  # our own error raised inside the generator
        if isinstance(e.__cause__, FinetuneError):
            raise e.__cause__ from None
        raise
    except ValueError:  # datasets refuses a generator that yields nothing: every row was dropped (lenient mode)
        if first:
            raise
        ds = datasets.Dataset.from_dict({"example": [], "row": []}, features=features)
    _check_drop_fraction(spec, ref, data_cfg, reasons, counts["read"])
    order = _weighted_order(ref, len(ds), seed)
    if order is not None:
        ds = ds.select(order)
    ds = ds.map(_tokenize_batch, batched=True, batch_size=MAP_BATCH, writer_batch_size=MAP_BATCH,
                remove_columns=["example"], num_proc=_num_proc(data_cfg, len(ds)), new_fingerprint=uuid.uuid4().hex,
                fn_kwargs={"tokenizer": tokenizer, "chat": templates, "max_length": data_cfg.max_length,
                           "assistant_only_loss": data_cfg.assistant_only_loss},
                desc=f"Tokenizing {ref.name}:{ref.split}")
    full_length, trained, problems = (list(ds[c]) for c in ("full_length", "trained", "problem"))
    refused = [i for i, p in enumerate(ds["refused"]) if p]
    refused_set = set(refused)
    where = _where(spec, ref)
    if refused and data_cfg.strict:
        raise FinetuneError(f"{where}: row {ds[refused[0]]['row']}: {problems[refused[0]]}. Fix the row, or set "
                            "data.strict: false to skip bad rows")
    # Rows the template cannot render or mask are malformed rows too; rows whose answer max_length cut away are not.
    reasons.update(problems[i] for i in refused)
    _check_drop_fraction(spec, ref, data_cfg, reasons, counts["read"])
    reasons.update(p for i, p in enumerate(problems) if p and i not in refused_set)
    keep = [i for i, p in enumerate(problems) if not p]
    if len(keep) < len(ds):
        ds = ds.select(keep)
    stats = {
        "dataset": ref.name, "split": ref.split, "rows_read": counts["read"], "rows": len(keep),
        "truncated": sum(1 for n in full_length if n > data_cfg.max_length),
        "dropped": dict(reasons), "tokens": sum(min(full_length[i], data_cfg.max_length) for i in keep),
        "trained_tokens": sum(trained[i] for i in keep),
    }
    return ds.select_columns(["input_ids", "labels", "prompt"]), stats, {where: split_digest(spec, ref.split)}, \
        (first[0] if first else None)


def _fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


@contextlib.contextmanager
def maps_outside_cache():
    """While the block runs, datasets' map writes its results to a temporary folder of this process (datasets' own
    behaviour with caching off), not beside the dataset mapped: a dataset read from the processed-data cache is then
    never written into, however many processes map it at once."""
    import datasets

    was_on = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_caching()


def prepare(data_cfg, tokenizer, templates, seed: int = 42) -> Prepared:
    """Load, check, tokenize and cache the training and held-out data of a recipe."""
    import datasets

    # The cache key covers everything the result depends on: file contents, tokenizer, template, settings.
    specs = [(ref, load_spec(ref.name)) for ref in [*data_cfg.datasets, *data_cfg.eval_datasets]]
    content = []
    for ref, spec in specs:
        files = [spec.files[ref.split]] if ref.split in spec.files else []
        described = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("description", "license")}
        content.append([ref.name, ref.split, ref.weight, ref.max_rows, described,
                        [split_digest(spec, ref.split)] if files and Path(files[0]).is_file() else []])
    special = [tokenizer.special_tokens_map, tokenizer.bos_token_id, tokenizer.eos_token_id]  # rendered by templates
    key_data = [CACHE_VERSION, content, _fingerprint(tokenizer), special, templates.training, templates.route,
                data_cfg.max_length,
                data_cfg.assistant_only_loss, data_cfg.strict, data_cfg.max_drop_fraction, seed,
                len(data_cfg.datasets)]
    key = hashlib.sha256(json.dumps(key_data, default=str).encode()).hexdigest()[:20]
    cache_root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else home_dir() / "data"
    entry = cache_root / key
    with file_lock(cache_root / f".{key}.lock"):
        if not (entry / "stats.json").is_file():
            _build_cache_entry(entry, data_cfg, tokenizer, templates, seed)
    meta = json.loads((entry / "stats.json").read_text())
    train = datasets.load_from_disk(str(entry / "train"))
    eval_ds = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").exists() else None
    meta["stats"]["cache"] = str(entry)
    return Prepared(train, eval_ds, meta["stats"], meta["hashes"], meta["first_example"])


def _build_cache_entry(entry: Path, data_cfg, tokenizer, templates, seed: int) -> None:
    import datasets

    stack = contextlib.ExitStack()
    work = stack.enter_context(work_dir(entry))  # locked: a dead process's is removed by the next build
    try:
        parts, per_dataset, hashes, first = {"train": [], "eval": []}, [], {}, None
        for which, refs in (("train", data_cfg.datasets), ("eval", data_cfg.eval_datasets)):
            for n, ref in enumerate(refs):
                ds, stats, digest, example = _load_split(ref, tokenizer, templates, data_cfg, seed,
                                                         work / f"{which}{n}")
                parts[which].append(ds)
                per_dataset.append({**stats, "held_out": True} if which == "eval" else stats)
                hashes.update(digest)
                first = first if first is not None or which == "eval" else example
        train = datasets.concatenate_datasets(parts["train"]) if parts["train"] else None
        eval_ds = datasets.concatenate_datasets(parts["eval"]) if parts["eval"] else None
        if train is None or len(train) == 0:
            counts = "; ".join(f"{s['dataset']}:{s['split']} read {s['rows_read']}, dropped {s['dropped']}"
                               for s in per_dataset)
            raise FinetuneError(f"no training rows left after checks ({counts}); see `finetune validate`")
        overlap = None
        if eval_ds is not None and len(eval_ds):
            train_prompts = (p for batch in train.select_columns(["prompt"]).iter(batch_size=1000)
                             for p in batch["prompt"])
            overlap = find_overlap(train_prompts, list(eval_ds["prompt"]))
        train_stats = [s for s in per_dataset if not s.get("held_out")]
        stats = {
            "train_rows": len(train),
            "train_tokens": sum(s["tokens"] for s in train_stats),
            "trained_tokens": sum(s["trained_tokens"] for s in train_stats),
            "eval_rows": len(eval_ds) if eval_ds is not None else 0,
            "truncated": sum(s["truncated"] for s in per_dataset),
            "dropped": sum(sum(s["dropped"].values()) for s in per_dataset),
            "overlap": overlap,
            "datasets": per_dataset,
        }
        with staged_dir(entry, replace=True) as tmp:
            train.select_columns(["input_ids", "labels"]).save_to_disk(str(tmp / "train"))
            if eval_ds is not None and len(eval_ds):
                eval_ds.select_columns(["input_ids", "labels"]).save_to_disk(str(tmp / "eval"))
            write_json(tmp / "stats.json", {"stats": stats, "hashes": hashes, "first_example": first})
    finally:
        stack.close()


def prepare_rows(data_cfg, shape: str, stage: str, seed: int = 42) -> Prepared:
    """Training and held-out rows of a non-SFT stage, checked and converted to its row shape (TRL's conversational
    dataset formats), with the same statistics and overlap report as SFT. TRL tokenizes them."""
    import datasets

    splits, per_dataset, hashes = {"train": [], "eval": []}, [], {}
    for which, refs in (("train", data_cfg.datasets), ("eval", data_cfg.eval_datasets)):
        for ref in refs:
            rows, reasons, rows_read, digest = read_checked(ref, data_cfg, seed, shape, stage)
            splits[which] += rows
            hashes.update(digest)
            per_dataset.append({"dataset": ref.name, "split": ref.split, "rows_read": rows_read, "rows": len(rows),
                                "dropped": dict(reasons), **({"held_out": True} if which == "eval" else {})})
    if not splits["train"]:
        counts = "; ".join(f"{s['dataset']}:{s['split']} read {s['rows_read']}, dropped {s['dropped']}"
                           for s in per_dataset)
        raise FinetuneError(f"no training rows left after checks ({counts}); see `finetune validate`")
    prompt = lambda row: prompt_text([*row["prompt"], {"role": "assistant", "content": ""}])  # noqa: E731
    overlap = (find_overlap([prompt(r) for r in splits["train"]], [prompt(r) for r in splits["eval"]])
               if splits["eval"] else None)
    stats = {"train_rows": len(splits["train"]), "eval_rows": len(splits["eval"]),
             "dropped": sum(sum(s["dropped"].values()) for s in per_dataset), "overlap": overlap,
             "datasets": per_dataset}
    train = datasets.Dataset.from_list(splits["train"])
    eval_ds = datasets.Dataset.from_list(splits["eval"]) if splits["eval"] else None
    return Prepared(train, eval_ds, stats, hashes, splits["train"][0])
