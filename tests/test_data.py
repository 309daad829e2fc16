"""Data: malformed rows name file, row and reason; formats convert; truncation and overlap are counted."""

from __future__ import annotations

import json

import pytest
from conftest import CONVERSATIONS, write_jsonl

from finetune import data as data_lib
from finetune import templates
from finetune.errors import FinetuneError
from finetune.recipe import DataConfig, DatasetRef

GOOD = {"messages": CONVERSATIONS[0]}


@pytest.fixture
def chat(smol_tokenizer):
    return templates.resolve(smol_tokenizer, "auto")


def _cfg(tmp_path, path, **kw):
    return DataConfig(datasets=[DatasetRef(name=str(path))], cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "unparsable JSON"),
        (json.dumps({"text": "no messages"}), "missing field 'messages'"),
        (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), "unknown role 'bot'"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}),
         "empty assistant turn"),
        (json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}),
         "message 0 content is int, not text"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn"),
    ],
)
def test_strict_mode_names_file_row_and_reason(tmp_path, smol_tokenizer, chat, bad_line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + bad_line + "\n")
    with pytest.raises(FinetuneError) as info:
        data_lib.prepare(_cfg(tmp_path, path), smol_tokenizer, chat)
    message = str(info.value)
    assert message.startswith(f"{path}: row 3: {reason}")
    assert "data.strict: false" in message


def test_lenient_mode_skips_and_counts_then_fails_over_the_limit(tmp_path, smol_tokenizer, chat):
    rows = [GOOD] * 98 + [{"messages": [{"role": "bot", "content": "x"}]}, {"nothing": 1}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = data_lib.prepare(_cfg(tmp_path, path, strict=False, max_drop_fraction=0.05), smol_tokenizer, chat)
    assert prepared.stats["train_rows"] == 98
    assert prepared.stats["datasets"][0]["dropped"] == {
        "unknown role 'bot' (allowed: system, user, assistant, tool)": 1, "missing field 'messages'": 1}
    with pytest.raises(FinetuneError, match=r"2 of 100 rows are malformed .* more than data.max_drop_fraction = 0.01"):
        data_lib.prepare(_cfg(tmp_path, path, strict=False), smol_tokenizer, chat)


def test_formats_convert_to_the_same_messages(tmp_path):
    want = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rows = {
        "messages": {"messages": want},
        "sharegpt": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        "alpaca": {"instruction": "Q", "input": "", "output": "A"},
        "prompt_completion": {"prompt": "Q", "completion": "A"},
    }
    for fmt, row in rows.items():
        spec = data_lib.DatasetSpec(format=fmt)
        assert data_lib.to_messages(spec, row) == want, fmt
    alpaca = data_lib.to_messages(data_lib.DatasetSpec(format="alpaca"),
                                  {"instruction": "Q", "input": "ctx", "output": "A"})
    assert alpaca[0]["content"] == "Q\n\nctx"
    mapped = data_lib.DatasetSpec(format="prompt_completion", columns={"prompt": "question", "completion": "answer"})
    assert data_lib.to_messages(mapped, {"question": "Q", "answer": "A"}) == want
    assert "dpo/reward" in data_lib.to_messages(data_lib.DatasetSpec(format="preference"), {"prompt": "Q"})


def test_format_is_guessed_for_bare_files(tmp_path):
    assert data_lib.load_spec(str(write_jsonl(tmp_path / "a.jsonl",
                                              [{"instruction": "Q", "output": "A"}]))).format == "alpaca"
    assert data_lib.load_spec(str(write_jsonl(tmp_path / "b.jsonl", [{"conversations": []}]))).format == "sharegpt"
    (tmp_path / "c.csv").write_text("prompt,completion\nQ,A\n")
    assert data_lib.load_spec(str(tmp_path / "c.csv")).format == "prompt_completion"


def test_csv_rows_are_read_with_datasets_and_numbered_like_the_file(tmp_path, smol_tokenizer, chat):
    (tmp_path / "c.csv").write_text("prompt,completion\nQ,A\nQ2,\n")
    with pytest.raises(FinetuneError, match=r"c.csv: row 3: "):
        data_lib.prepare(_cfg(tmp_path, tmp_path / "c.csv"), smol_tokenizer, chat)


def test_rows_whose_answer_is_truncated_away_are_dropped_and_counted(tmp_path, smol_tokenizer, chat):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_prompt, GOOD])
    for packing in (True, False):
        prepared = data_lib.prepare(_cfg(tmp_path, path, max_length=64, packing=packing), smol_tokenizer, chat)
        assert prepared.stats["train_rows"] == 2
        assert prepared.stats["truncated"] == 1
        assert prepared.stats["datasets"][0]["dropped"] == {"answer truncated away by max_length": 1}
        assert all(len(ids) <= 64 for ids in prepared.train["input_ids"])


def test_overlap_between_train_and_held_out_is_reported():
    train = ["What is the capital of France?", "Name three primary colours please.", "Tell me a joke about cats now"]
    held = ["what is the  capital of FRANCE?", "Name three primary colours please!", "Something else entirely here"]
    overlap = data_lib.find_overlap(train, held)
    assert overlap["exact"] == 1  # case and spacing are ignored
    assert overlap["near"] == 1  # one character differs
    assert len(overlap["examples"]) == 2


def test_processed_data_is_cached_by_content_tokenizer_and_template(tmp_path, smol_tokenizer, chat):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    first = data_lib.prepare(_cfg(tmp_path, path), smol_tokenizer, chat)
    again = data_lib.prepare(_cfg(tmp_path, path), smol_tokenizer, chat)
    assert first.stats["cache"] == again.stats["cache"]
    other_template = templates.resolve(smol_tokenizer, "chatml")
    assert data_lib.prepare(_cfg(tmp_path, path), smol_tokenizer, other_template).stats["cache"] != first.stats["cache"]
    write_jsonl(path, [GOOD] * 4)
    changed = data_lib.prepare(_cfg(tmp_path, path), smol_tokenizer, chat)
    assert changed.stats["cache"] != first.stats["cache"] and changed.stats["train_rows"] == 4


def test_unknown_dataset_name_lists_known_ones():
    with pytest.raises(FinetuneError, match="dataset 'nope' not found.*known datasets: .*json_extract"):
        data_lib.load_spec("nope")


def test_shipped_skill_set_is_clean(smol_tokenizer, chat, tmp_path):
    cfg = DataConfig(datasets=[DatasetRef(name="json_extract")],
                     eval_datasets=[DatasetRef(name="json_extract", split="heldout")],
                     cache_dir=str(tmp_path / "cache"))
    stats = data_lib.prepare(cfg, smol_tokenizer, chat).stats
    assert stats["train_rows"] >= 300 and stats["eval_rows"] >= 50
    assert stats["dropped"] == 0 and stats["overlap"]["exact"] == 0 and stats["overlap"]["near"] == 0


def test_the_overlap_finder_misses_no_pair_a_full_comparison_finds():
    """The MinHash-banded index against every train/held-out pair compared in full."""
    import random

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    train = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    held = []
    for i in range(80):  # copies with a few characters changed, and new prompts
        text = rng.choice(train) if i % 2 else " ".join(rng.choice(words) for _ in range(8))
        chars = list(text)
        for _ in range(rng.randint(0, 3)):
            chars[rng.randrange(len(chars))] = rng.choice("xyz")
        held.append("".join(chars))

    def grams(text):
        text = " ".join(text.lower().split())
        return {text[i : i + 5] for i in range(max(1, len(text) - 4))}

    exact = [h for h in held if " ".join(h.lower().split()) in {" ".join(t.lower().split()) for t in train}]
    near = [h for h in held if h not in exact and any(
        len(grams(h) & grams(t)) / len(grams(h) | grams(t)) >= 0.8 for t in train)]
    found = data_lib.find_overlap(iter(train), held)
    assert (found["exact"], found["near"]) == (len(exact), len(near))
    assert found["near"] >= 3 and found["exact"] >= 3  # the set holds both kinds


def test_parallel_tokenization_equals_one_process_and_shows_progress(tmp_path, smol_tokenizer, chat, capfd):
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": f"Answer {i} " * (i % 7 + 1)}]} for i in range(600)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one = data_lib.prepare(_cfg(tmp_path / "a", path, num_proc=1), smol_tokenizer, chat)
    two = data_lib.prepare(_cfg(tmp_path / "b", path, num_proc=2), smol_tokenizer, chat)
    assert one.train["input_ids"][:] == two.train["input_ids"][:] and one.train["labels"][:] == two.train["labels"][:]
    assert len(one.train) == 600 and one.stats["train_tokens"] == two.stats["train_tokens"]
    assert capfd.readouterr().err.count(f"Tokenizing {path}:train") >= 2  # a progress bar on stderr, each time


def test_a_hub_dataset_revision_is_part_of_its_cache_key(tmp_path):
    (tmp_path / "hubset.yaml").write_text("hub: someone/chats\nrevision: 0123abc\nformat: messages\n")
    spec = data_lib.load_spec(str(tmp_path / "hubset.yaml"))
    other = data_lib.load_spec(str(tmp_path / "hubset.yaml"))
    other.revision = "fedcba9"
    assert spec.revision == "0123abc"
    assert data_lib.split_digest(spec, "train") != data_lib.split_digest(other, "train")


def test_tool_rows_the_template_refuses_are_named_by_row_and_count_as_malformed(tmp_path, smol_tokenizer, chat):
    """SmolLM2's template renders no tool calls: in strict mode the row is named; leniently it is skipped and
    counted against max_drop_fraction like any malformed row."""
    tool_row = {"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "-3"}, {"role": "assistant", "content": "Cold."}]}
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 7 + [tool_row] + [GOOD] * 2)
    with pytest.raises(FinetuneError, match=rf"{path}: row 8: the chat template does not render tool calls"):
        data_lib.prepare(_cfg(tmp_path, path), smol_tokenizer, chat)
    with pytest.raises(FinetuneError, match=r"1 of 10 rows are malformed"):
        data_lib.prepare(_cfg(tmp_path, path, strict=False, max_drop_fraction=0.0), smol_tokenizer, chat)
    prepared = data_lib.prepare(_cfg(tmp_path, path, strict=False, max_drop_fraction=0.2), smol_tokenizer, chat)
    assert prepared.stats["train_rows"] == 9


def test_tool_call_arguments_given_as_json_text_are_parsed():
    spec = data_lib.DatasetSpec(format="messages")
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "2"}, {"role": "assistant", "content": "2"}]}
    messages = data_lib.to_messages(spec, row)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and messages[1]["content"] == ""
    bad = json.loads(json.dumps(row))
    bad["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{a: 1"
    assert "tool call 'f' has arguments that are not valid JSON" in data_lib.to_messages(spec, bad)
    lone = {"messages": [{"role": "user", "content": "hi \ud83d"}, {"role": "assistant", "content": "ok"}]}
    assert "unpaired UTF-16 surrogate" in data_lib.to_messages(spec, lone)


def test_the_cache_key_covers_which_token_is_eos(tmp_path, smol_path, chat):
    from transformers import AutoTokenizer

    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    one = data_lib.prepare(_cfg(tmp_path, path), AutoTokenizer.from_pretrained(smol_path), chat)
    other = AutoTokenizer.from_pretrained(smol_path, eos_token="<|endoftext|>")
    assert data_lib.prepare(_cfg(tmp_path, path), other, chat).stats["cache"] != one.stats["cache"]
