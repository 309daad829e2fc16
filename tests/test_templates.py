"""Chat templates and loss masks: exactly the assistant tokens and their end-of-turn tokens are trained."""

from __future__ import annotations

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
    """A base-model tokenizer without a chat template whose vocabulary lacks the ChatML tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "hello", "world", "user", "assistant", "system"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def test_base_model_without_template_gets_chatml_and_its_tokens():
    tok = _word_tokenizer()
    assert tok.chat_template is None and "<|im_end|>" not in tok.get_vocab()
    chat = templates.resolve(tok, "auto")
    assert chat.family == "chatml"
    assert chat.added_tokens == ["<|im_start|>", "<|im_end|>"]
    assert len(tok) == 9
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
def test_trained_tokens_of_a_multi_turn_chat_are_exactly_the_assistant_turns(tmp_path, tiny_llama, smol_tokenizer, packing):
    """Taken from the trainer's collated batch; SmolLM2's pad token IS its end-of-turn token (<|im_end|>)."""
    from finetune.sft import build

    assert smol_tokenizer.pad_token_id == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    conversation = CONVERSATIONS[1]  # system + two user/assistant exchanges
    data = write_jsonl(tmp_path / "one.jsonl", [{"messages": conversation}, {"messages": CONVERSATIONS[0]}])
    recipe = tiny_recipe(tmp_path, tiny_llama, data, data={"packing": packing}, train={"shuffle_dataset": False})
    trainer, *_ = build(recipe)
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
