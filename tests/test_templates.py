"""Chat templates and loss masks: exactly the assistant tokens and their end-of-turn tokens are trained."""

from __future__ import annotations

import json

import pytest
from conftest import CONVERSATIONS, tiny_recipe, write_jsonl

from finetune import templates
from finetune.errors import FinetuneError


@pytest.mark.parametrize("family", templates.FAMILIES)
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
    with pytest.raises(FinetuneError, match="matches none of the known families"):
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
