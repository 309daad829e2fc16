"""Generation shared by compare/chat/eval, and `finetune compare` end to end, on tiny models (real torch)."""

from __future__ import annotations

import dataclasses
import html
import json

import pytest
from conftest import CONVERSATIONS, tiny_recipe, write_jsonl

from finetune import cli
from finetune.generate import generate, load_for_inference, release

# Prompts of different lengths (strings and chat messages), one with HTML in it.
PROMPTS = [
    "Hi",
    "Name a colour.",
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
    "Count to three, then explain in a long and winding sentence why counting matters to anyone at all.",
    "x",
    "Is <script>alert('hi')</script> & friends safe?",
]
NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on 2 shared cores threads waiting for each other
    at every small op make generation up to 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    loaded = load_for_inference(str(tiny_llama), dtype="fp32")
    yield loaded
    release(loaded)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory):
    """A run directory: 3 LoRA steps on the tiny Llama."""
    from finetune.stages import sft

    tmp = tmp_path_factory.mktemp("tiny-run")
    data = write_jsonl(tmp / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    return sft.main(tiny_recipe(tmp, tiny_llama, data, train={"max_steps": 3, "learning_rate": 5e-2}))


def test_loaded_model_is_described_and_pads_left(tiny, tiny_llama, smol_tokenizer):
    assert tiny.prompt_style == "chat"  # the tiny models carry SmolLM2's tokenizer and template
    assert tiny.tokenizer.padding_side == "left" and tiny.tokenizer.pad_token_id is not None
    assert smol_tokenizer.convert_tokens_to_ids("<|im_end|>") in tiny.stop_ids
    assert str(tiny_llama) in tiny.description and "LlamaForCausalLM" in tiny.description
    assert not tiny.model.training


def test_batched_greedy_equals_one_at_a_time_in_fp32(tiny):
    lengths = {len(tiny.tokenizer(tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": p}] if isinstance(p, str) else p, tokenize=False, add_generation_prompt=True)
    )["input_ids"]) for p in PROMPTS}
    assert len(lengths) >= 5  # the batch really mixes lengths, so left padding is exercised
    single = [generate(tiny, [p], max_new_tokens=NEW)[0] for p in PROMPTS]
    for batch_size in (6, 4):
        batched = generate(tiny, PROMPTS, max_new_tokens=NEW, batch_size=batch_size)
        assert [o["token_ids"] for o in batched] == [o["token_ids"] for o in single]
        assert [o["text"] for o in batched] == [o["text"] for o in single]
    assert all(o["token_ids"] for o in single)


def test_seeded_sampling_repeats_exactly(tiny):
    kwargs = dict(max_new_tokens=NEW, decoding="sample", temperature=1.0, top_k=0, top_p=1.0)
    first = generate(tiny, PROMPTS, seed=7, **kwargs)
    again = generate(tiny, PROMPTS, seed=7, **kwargs)
    other = generate(tiny, PROMPTS, seed=8, **kwargs)
    assert [o["token_ids"] for o in first] == [o["token_ids"] for o in again]
    assert [o["token_ids"] for o in first] != [o["token_ids"] for o in other]
    greedy = generate(tiny, PROMPTS, max_new_tokens=NEW)
    assert [o["token_ids"] for o in first] != [o["token_ids"] for o in greedy]


def test_stopped_exactly_when_a_stop_id_is_generated(tiny):
    plain = generate(tiny, PROMPTS, max_new_tokens=NEW)
    assert not any(o["stopped"] for o in plain)  # a random model never says <|im_end|> here
    assert all(len(o["token_ids"]) == NEW for o in plain)
    # Make a token the model does generate a stop id: answers must end just before it, and only those.
    stop = plain[0]["token_ids"][3]
    stopping = dataclasses.replace(tiny, stop_ids=tiny.stop_ids | {stop})
    outs = generate(stopping, PROMPTS, max_new_tokens=NEW, batch_size=3)
    for before, after in zip(plain, outs):
        if stop in before["token_ids"]:
            cut = before["token_ids"].index(stop)
            assert after["stopped"] and after["token_ids"] == before["token_ids"][:cut]
            assert after["text"] == tiny.tokenizer.decode(before["token_ids"][:cut], skip_special_tokens=True).strip()
        else:
            assert not after["stopped"] and after["token_ids"] == before["token_ids"]
    assert outs[0]["stopped"] and len(outs[0]["token_ids"]) <= 3


def test_run_directory_loads_base_plus_adapter_and_answers_differently(tiny, tiny_run):
    from peft import PeftModel

    tuned = load_for_inference(str(tiny_run), dtype="fp32")
    try:
        assert isinstance(tuned.model, PeftModel)
        assert f"LoRA adapter from run {tiny_run}" in tuned.description and "3 steps" in tuned.description
        assert tuned.info["kind"] == "run" and tuned.prompt_style == "chat" and tuned.stop_ids == tiny.stop_ids
        ours = generate(tuned, PROMPTS, max_new_tokens=NEW)
    finally:
        release(tuned)
    base = generate(tiny, PROMPTS, max_new_tokens=NEW)
    assert [o["token_ids"] for o in ours] != [o["token_ids"] for o in base]


def test_compare_end_to_end_writes_escaped_reports(tiny_llama, tiny_run, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Is <script>alert('x')</script> & co safe?", "reference": "No & never <b>."},
        {"prompt": "Name a colour."},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]},
    ])
    out = tmp_path / "report"
    import torch
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    code = cli.main(["compare", "--model", f"base={tiny_llama}", "--model", f"tuned={tiny_run}",
                     "--prompt-style", "base=completion", "--prompts", str(prompts), "--max-new-tokens", "6",
                     "--dtype", "fp32", "--adherence-regex", r"\w+", "--out", str(out)])
    assert code == 0
    # The quieted library settings are put back: a later train in this process still shows its progress bar.
    assert hf_logging.is_progress_bar_enabled() and torch.get_num_threads() == threads
    printed = capsys.readouterr().out
    assert "Exact match" in printed and str(out / "report.html") in printed

    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2
    assert {(r["prompt_index"], r["model"]) for r in rows} == {(i, m) for i in range(3) for m in ("base", "tuned")}
    assert rows[-1]["reference"] == "Hi there!"  # a prompt's final assistant turn is its reference
    page = (out / "report.html").read_text()
    assert "<script>" not in page
    for row in rows:
        assert html.escape(row["prompt"], quote=True) in page
        assert html.escape(row["text"], quote=True) in page
    assert html.escape("No & never <b>.", quote=True) in page
    summary = json.loads((out / "compare.json").read_text())
    assert [m["name"] for m in summary["models"]] == ["base", "tuned"]
    assert summary["models"][0]["prompt_style"] == "completion" and summary["models"][1]["prompt_style"] == "chat"
    assert "LoRA adapter from run" in summary["models"][1]["description"]
    assert set(summary["metrics"]) == {"base", "tuned"} and summary["metrics"]["base"]["n"] == 3
    assert "adherence" in summary["metrics"]["tuned"] and summary["settings"]["max_new_tokens"] == 6
    assert (out / "report.md").is_file()


def test_bad_prompt_rows_are_named(tmp_path, capsys, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"messages": [{"role": "bot", "content": "hi"}]}\n')
    code = cli.main(["compare", "--model", f"m={tiny_llama}", "--prompts", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}: row 2: unknown role 'bot'" in err
    bad.write_text('{"prompt": "fine"}\n{"question": "where is the prompt?"}\n')
    assert cli.main(["compare", "--model", f"m={tiny_llama}", "--prompts", str(bad)]) == 2
    assert f"{bad}: row 2: no `prompt` or `messages`" in capsys.readouterr().err
    assert cli.main(["compare", "--model", str(tiny_llama), "--prompts", str(bad)]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def test_dataset_prompts_take_the_heldout_split_and_its_regex():
    from finetune.compare import load_prompts

    prompts = load_prompts("json_extract", max_prompts=5)
    assert prompts.split == "heldout" and len(prompts.items) == 5
    assert prompts.adherence_regex and prompts.items[0]["reference"].startswith('{"name": ')
    assert prompts.items[0]["messages"][-1]["role"] == "user"


def test_reward_model_scores_every_answer(tiny_llama, smol_tokenizer, tmp_path, capsys):
    """--reward-model: each answer is scored by a one-output sequence classifier; the report's `reward` is
    their mean, and equals scoring the same answers directly."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from finetune.compare import reward_scores

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=smol_tokenizer.pad_token_id)
    reward_dir = tmp_path / "reward"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(reward_dir)
    smol_tokenizer.save_pretrained(reward_dir)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Name a colour."}, {"prompt": "Say hi."}])
    out = tmp_path / "report"
    assert cli.main(["compare", "--model", f"m={tiny_llama}", "--prompts", str(prompts), "--max-new-tokens", "4",
                     "--dtype", "fp32", "--reward-model", str(reward_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    direct = reward_scores(str(reward_dir), [[{"role": "user", "content": r["prompt"]}] for r in rows],
                           [r["text"] for r in rows])
    assert summary["metrics"]["m"]["reward"] == pytest.approx(sum(direct) / len(direct), abs=1e-5)
    assert summary["settings"]["reward_model"] == str(reward_dir)
    assert "Mean reward" in capsys.readouterr().out
