"""Chat templates and loss masks: exactly the assistant tokens and their end-of-turn tokens are trained."""

from __future__ import annotations

import json

import pytest
from conftest import CONVERSATIONS, tiny_recipe, write_jsonl

from finetune import templates
from finetune.errors import FinetuneError


@pytest.mark.parametrize("family", templates.RENDER_MATCHED)
def test_training_template_without_markers_renders_like_the_inference_template(family):
    inference, training = templates.load_family(family)
    assert templates.has_markers(training) and not templates.has_markers(inference)
    assert templates.renders_identically(templates.strip_markers(training), inference)


def test_smollm2_family_is_the_embedded_models_own_template(smol_tokenizer):
    chat = templates.resolve(smol_tokenizer, "auto")
    assert chat.family == "smollm2"
    assert chat.inference == smol_tokenizer.chat_template  # runs and exports keep the model's own template
    assert chat.added_tokens == []


def _word_tokenizer():
    """A base-model tokenizer without a chat template whose vocabulary lacks the ChatML tokens: a tiny
    byte-level BPE (the kind Qwen2's tokenizer class reloads faithfully), trained here on a few words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["hello world", "user assistant system", "hello there world"] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


def test_base_model_without_template_gets_chatml_and_its_tokens():
    tok = _word_tokenizer()
    vocab_before = len(tok)
    assert tok.chat_template is None and "<|im_end|>" not in tok.get_vocab()
    chat = templates.resolve(tok, "auto")
    assert chat.family == "chatml"
    assert chat.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert len(tok) == vocab_before + 2
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], chat_template=chat.inference, tokenize=True,
                                  return_dict=False, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids and tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert templates.end_of_turn_token_id(tok, chat.training) == tok.convert_tokens_to_ids("<|im_end|>")


def test_unknown_template_is_refused_with_a_way_out(smol_tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(FinetuneError, match="no end-of-turn marker.*data.chat_template"):
        templates.resolve(tok, "auto")


def _expected_mask(tokenizer, conversation):
    """Worked out independently of the template machinery: render each assistant turn's text plus <|im_end|>
    and find its tokens in the rendered conversation."""
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    mask = [0] * len(ids)
    start = 0
    for message in conversation:
        if message["role"] != "assistant":
            continue
        target = tokenizer(message["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        for i in range(start, len(ids) - len(target) + 1):
            if ids[i : i + len(target)] == target:
                mask[i : i + len(target)] = [1] * len(target)
                start = i + len(target)
                break
        else:
            raise AssertionError("assistant turn not found")
    return ids, mask


@pytest.mark.parametrize("packing", [True, False])
def test_trained_tokens_of_a_multi_turn_chat_are_exactly_the_assistant_turns(tmp_path, tiny_llama, smol_tokenizer,
                                                                              packing):
    """Taken from the trainer's collated batch; SmolLM2's pad token IS its end-of-turn token (<|im_end|>)."""
    from finetune.stages.runner import build

    assert smol_tokenizer.pad_token_id == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = CONVERSATIONS[1]  # system + two user/assistant exchanges
    data = write_jsonl(tmp_path / "one.jsonl", [{"messages": conversation}, {"messages": CONVERSATIONS[0]}])
    recipe = tiny_recipe(tmp_path, tiny_llama, data, data={"packing": packing}, train={"shuffle_dataset": False})
    trainer = build(recipe).trainer
    batch = next(iter(trainer.get_train_dataloader()))
    want_ids, want_mask = _expected_mask(smol_tokenizer, conversation)
    rows = zip(batch["input_ids"].tolist(), batch["labels"].tolist())
    found = False
    for ids, labels in rows:
        for offset in range(len(ids) - len(want_ids) + 1):
            if ids[offset : offset + len(want_ids)] == want_ids:
                got_mask = [int(label != -100) for label in labels[offset : offset + len(want_ids)]]
                assert got_mask == want_mask
                trained = [t for t, m in zip(want_ids, got_mask) if m]
                assert smol_tokenizer.decode(trained) == "Paris.<|im_end|>Rome.<|im_end|>"
                found = True
    assert found, "the conversation was not in the first batch"


def test_validate_shows_the_trained_tokens(tmp_path, tiny_llama, chat_file):
    from finetune.validate import main

    shown = main(tiny_recipe(tmp_path, tiny_llama, chat_file, train={"shuffle_dataset": False}))["example"]
    assert "[[Blue.<|im_end|>]]" in shown or "[[Paris.<|im_end|>]]" in shown
    assert "<|im_start|>user" in shown and "[[<|im_start|>" not in shown


def test_added_chat_tokens_get_trained_embedding_rows_that_are_saved(tmp_path):
    """A base model whose vocabulary lacks <|im_start|>/<|im_end|>: the tokens are added, their embedding rows
    are trained (peft trainable tokens) and saved with the adapter; the other rows stay as they were."""
    from conftest import build_tiny
    from safetensors.torch import load_file

    from finetune.stages import sft

    tok = _word_tokenizer()
    model_dir = build_tiny("qwen2", tok, tmp_path / "word-qwen2", tie=False)
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}] * 8
    data = write_jsonl(tmp_path / "w.jsonl", rows)
    run_dir = sft.main(tiny_recipe(tmp_path, model_dir, data, train={"max_steps": 4}))
    run = json.loads((run_dir / "run.json").read_text())
    assert run["chat_template"]["family"] == "chatml"
    assert run["chat_template"]["added_tokens"] == ["<|im_start|>", "<|im_end|>"]
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    token_keys = [k for k in saved if "token_adapter" in k or "trainable_tokens" in k]
    assert token_keys, sorted(saved)[:10]
    rows_saved = saved[token_keys[0]]
    assert rows_saved.shape[0] == 2  # exactly the two new tokens' rows
    assert json.loads((run_dir / "adapter" / "tokenizer_config.json").read_text())  # tokenizer saved with them
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(run_dir / "adapter")
    new_ids = reloaded.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert min(new_ids) >= len(tok) and new_ids[0] != new_ids[1]  # appended to the vocabulary, and kept


# ----------------------------------------------------------------------------- any chat family

TWO_TURNS = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]
TOOL_CALL = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "name": "get_weather", "content": "-3 C"},
    {"role": "assistant", "content": "It is -3 C in Oslo."},
]

# Each family's rendering of TWO_TURNS on the SmolLM2 tokenizer (whose BOS is <|im_start|>), written out by hand
# from the family's template: (text, trained). Trained: each answer and the tokens that close its turn.
FAMILY_CASES = {
    "gemma3": (["<start_of_turn>", "<end_of_turn>"], [
        ("<|im_start|><start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n", 0),
        ("Paris.<end_of_turn>\n", 1),
        ("<start_of_turn>user\nAnd Italy?<end_of_turn>\n<start_of_turn>model\n", 0),
        ("Rome.<end_of_turn>\n", 1)], "<end_of_turn>"),
    "phi3": (["<|user|>", "<|assistant|>", "<|end|>"], [
        ("<|user|>\nCapital of France?<|end|>\n<|assistant|>\n", 0),
        ("Paris.<|end|>\n", 1),
        ("<|user|>\nAnd Italy?<|end|>\n<|assistant|>\n", 0),
        ("Rome.<|end|>\n<|im_end|>", 1)], "<|end|>"),
    "qwen3": ([], [
        ("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\n\n</think>\n\nParis.<|im_end|>\n", 1),
        ("<|im_start|>user\nAnd Italy?<|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\n\n</think>\n\nRome.<|im_end|>\n", 1)], "<|im_end|>"),
    "llama3": (["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], [
        ("<|im_start|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("Paris.<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd Italy?<|eot_id|><|start_header_id|>assistant"
         "<|end_header_id|>\n\n", 0),
        ("Rome.<|eot_id|>", 1)], "<|eot_id|>"),
    "deepseekv3": (["<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"], [
        ("<|im_start|><｜User｜>Capital of France?", 0),
        ("<｜Assistant｜>Paris.<｜end▁of▁sentence｜>", 1),
        ("<｜User｜>And Italy?", 0),
        ("<｜Assistant｜>Rome.<｜end▁of▁sentence｜>", 1)], "<｜end▁of▁sentence｜>"),
}

# A Mistral-style template no family ships: the prefix route masks it.
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def _family_tokenizer(smol_tokenizer, template: str, tokens=()):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    if tokens:
        tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    tok.chat_template = template
    return tok


def _expected(tok, segments, whole=False):
    """Token ids and mask of hand-written (text, trained) segments. whole: the text tokenized in one piece, as TRL
    does with {% generation %} markers (a token is trained when it starts inside a trained segment); else piece by
    piece."""
    if whole:
        out = tok("".join(text for text, _ in segments), add_special_tokens=False, return_offsets_mapping=True)
        bounds, at = [], 0
        for text, trained in segments:
            bounds.append((at, at + len(text), trained))
            at += len(text)
        mask = [next(t for a, b, t in bounds if a <= start < b) for start, _ in out["offset_mapping"]]
        return out["input_ids"], mask
    ids, mask = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [trained] * len(piece)
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_a_model_with_a_family_template_is_masked_token_by_token(smol_tokenizer, family):
    """The model's own (inference) template, byte-identical to the one TRL ships: TRL's training twin is used."""
    tokens, segments, end = FAMILY_CASES[family]
    tok = _family_tokenizer(smol_tokenizer, templates.load_family(family)[0], tokens)
    chat = templates.resolve(tok, "auto")
    assert (chat.family, chat.route, chat.inference) == (family, "markers", tok.chat_template)
    assert templates.masked(tok, chat, TWO_TURNS) == _expected(tok, segments, whole=True)
    assert tok.convert_ids_to_tokens(templates.end_of_turn_token_id(tok, chat.training)) == end


def test_a_template_no_family_knows_is_masked_by_rendering_prefixes(smol_tokenizer):
    tok = _family_tokenizer(smol_tokenizer, INST_TEMPLATE)
    chat = templates.resolve(tok, "auto")
    assert (chat.family, chat.route) == ("model (prefix)", "prefix")
    want = _expected(tok, whole=True, segments=[("<|im_start|>[INST] Capital of France? [/INST]", 0),
                                                ("Paris.<|im_end|>", 1), ("[INST] And Italy? [/INST]", 0),
                                                ("Rome.<|im_end|>", 1)])
    assert templates.masked(tok, chat, TWO_TURNS) == want
    assert templates.end_of_turn_token_id(tok, chat.training) == tok.eos_token_id


def test_tool_calls_are_trained_and_tool_results_are_not(smol_tokenizer):
    from finetune.data import tokenize

    tok = _family_tokenizer(smol_tokenizer, templates.load_family("qwen3")[0])
    chat = templates.resolve(tok, "auto")
    got = tokenize(TOOL_CALL, tok, chat, 512, True)
    want_ids, want_mask = _expected(tok, whole=True, segments=[
        ("<|im_start|>user\nWeather in Oslo?<|im_end|>\n<|im_start|>assistant\n", 0),
        ('<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
         "</tool_call><|im_end|>\n", 1),
        ("<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n", 0),
        ("<think>\n\n</think>\n\nIt is -3 C in Oslo.<|im_end|>\n", 1)])
    assert got["input_ids"] == want_ids
    assert got["labels"] == [t if m else -100 for t, m in zip(want_ids, want_mask)]


def test_a_template_that_drops_tool_calls_refuses_the_row(smol_tokenizer):
    from finetune.data import RowError, tokenize

    chat = templates.resolve(smol_tokenizer, "auto")  # SmolLM2's ChatML template renders no tool calls
    got = tokenize(TOOL_CALL, smol_tokenizer, chat, 512, True)
    assert isinstance(got, RowError) and "does not render tool calls" in got and "data.chat_template" in got


def test_tool_messages_are_checked():
    from finetune.data import check_messages

    assert check_messages(TOOL_CALL) is None
    bad_call = [TOOL_CALL[0], {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]
    assert check_messages(bad_call) == "message 1 has a tool call without function.name"
    user_call = [{**TOOL_CALL[0], "tool_calls": TOOL_CALL[1]["tool_calls"]}, TOOL_CALL[3]]
    assert "only assistant turns call tools" in check_messages(user_call)
    assert check_messages([TOOL_CALL[0], {"role": "assistant", "content": ""}]) == "empty assistant turn"


def test_a_template_whose_prefixes_are_not_prefixes_is_refused_naming_the_key(smol_tokenizer):
    """Qwen3's own template drops the empty think block from earlier turns: a copy TRL does not recognise
    (one comment added) cannot be masked by prefixes, and the error says what to set."""
    tok = _family_tokenizer(smol_tokenizer, "{#- a local copy -#}\n" + templates.load_family("qwen3")[0])
    with pytest.raises(FinetuneError, match=r"message 2 \(assistant\) differently.*Set data.chat_template"):
        templates.resolve(tok, "auto")


def test_the_prefix_route_checks_each_conversation(smol_tokenizer):
    """A template that renders plain turns as prefixes but a tool call differently when it is the last turn: the
    conversation with a tool call is refused, the others train."""
    from finetune.data import RowError, tokenize

    template = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% elif m['role'] == 'tool' %}[RESULT]{{ m['content'] }}[/RESULT]"
                "{% elif m['role'] == 'assistant' %}{% if m.tool_calls %}[CALL]{{ m.tool_calls[0].function.name }}"
                "{% if loop.last %} now{% endif %}{% endif %}{{ m['content'] }}</s>{% endif %}{% endfor %}")
    tok = _family_tokenizer(smol_tokenizer, template)
    chat = templates.resolve(tok, "auto")
    assert chat.route == "prefix"
    assert not isinstance(tokenize(TWO_TURNS, tok, chat, 512, True), RowError)
    got = tokenize(TOOL_CALL, tok, chat, 512, True)
    assert isinstance(got, RowError) and "message 1 (assistant) differently" in got


def test_a_family_can_be_named_for_a_base_model(smol_tokenizer):
    tok = _family_tokenizer(smol_tokenizer, None)
    chat = templates.resolve(tok, "gemma3")
    assert chat.family == "gemma3" and chat.added_tokens == []
    with pytest.raises(FinetuneError, match="data.chat_template = 'gemma9' is invalid.*qwen3"):
        templates.resolve(tok, "gemma9")


def test_the_qwen3_recipe_trains_exports_and_compares_on_a_tiny_model(tmp_path, tiny_llama):
    """recipes/tiny/sft_qwen3.yaml on a tiny model: trained in the Qwen3 template, which the run, its export and
    the compare report carry."""
    from pathlib import Path

    from finetune import cli

    recipe = Path(__file__).parents[1] / "recipes" / "tiny" / "sft_qwen3.yaml"
    run = tmp_path / "run"
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in CONVERSATIONS] * 4)
    assert cli.main(["train", str(recipe), f"model.name={tiny_llama}", f"output_dir={run}", "train.max_steps=2",
                     "data.max_length=128", f"data.datasets=[{chats}]", "data.eval_datasets=[]",
                     "train.per_device_train_batch_size=2",
                     f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    qwen3 = templates.load_family("qwen3")[0]
    written = json.loads((run / "run.json").read_text())
    assert written["chat_template"]["family"] == "qwen3" and written["chat_template"]["end_of_turn"] == "<|im_end|>"
    assert cli.main(["export", str(run), "--skip-stop-check", "--dtype", "fp32"]) == 0
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run / "export").chat_template == qwen3
    out = tmp_path / "compare"
    assert cli.main(["compare", "--model", f"base={tiny_llama}", "--model", f"chat={run / 'export'}", "--prompts",
                     str(chats), "--max-prompts", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["metrics"]) == {"base", "chat"}


def test_the_prefix_route_adds_no_space_a_piecewise_tokenization_would(smol_tokenizer):
    """A tokenizer that prepends a space to every text it tokenizes (SentencePiece-style Metaspace): the prefix
    route tokenizes the rendered conversation once, so no "▁" appears at the start of each answer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    words = "Capital of France? Paris. And Italy? Rome. [INST] [/INST]".split()
    backend.train_from_iterator([" ".join(words)] * 20, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = INST_TEMPLATE
    chat = templates.resolve(tok, "auto")
    ids, mask = templates.masked(tok, chat, TWO_TURNS)
    rendered = "<s>[INST] Capital of France? [/INST]Paris.</s>[INST] And Italy? [/INST]Rome.</s>"
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    trained = tok.convert_ids_to_tokens([t for t, m in zip(ids, mask) if m])
    assert "".join(trained) == "Paris.</s>Rome.</s>"  # no "▁" before an answer: it is not a new word


def test_a_family_matched_by_rendering_must_render_tool_calls_alike(smol_tokenizer):
    """Qwen2.5's template with its tool-call tags renamed renders plain turns like the qwen2_5 family but tool
    calls differently: it is not matched to the family (whose twin would train the other tags)."""
    own = templates.load_family("qwen2_5")[0].replace("<tool_call>", "<functioncall>")
    tok = _family_tokenizer(smol_tokenizer, own)
    chat = templates.resolve(tok, "auto")
    assert chat.family != "qwen2_5"
    assert templates.resolve(_family_tokenizer(smol_tokenizer, templates.load_family("qwen2_5")[0]),
                             "auto").family == "qwen2_5"
