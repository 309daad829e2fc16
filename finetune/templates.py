"""Chat templates: the model's own (for inference and export) and its training twin (for loss masks).

TRL masks the loss to assistant tokens only when the template marks them with `{% generation %}`. We keep
one training template per family; with its markers removed it renders byte-identically to the family's
inference template (tests check this on fixed conversations). The markers include each assistant turn's
end-of-turn token, so the model learns to stop.

Families: smollm2 (ChatML with SmolLM2's default system prompt), chatml (plain ChatML, given to base
models that have no template), qwen2_5 and llama3 (TRL ships both versions of these).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import FinetuneError

_OURS = Path(__file__).parent / "templates"


def _trl_dir() -> Path:
    import trl

    return Path(trl.__file__).parent / "chat_templates"


def _family_files(name: str) -> tuple[Path, Path]:
    base = _OURS if name in ("smollm2", "chatml") else _trl_dir()
    return base / f"{name}.jinja", base / f"{name}_training.jinja"


FAMILIES = ("smollm2", "chatml", "qwen2_5", "llama3")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# Conversations on which templates are compared: system or not, multi-turn, odd whitespace.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [{"role": "user", "content": "line one\n\nline two"}, {"role": "assistant", "content": "  spaced  \n"}],
]


def strip_markers(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def has_markers(template: str | None) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def render(template: str, messages, add_generation_prompt=False, **special) -> str:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **special
    )


def renders_identically(a: str, b: str, special: dict | None = None) -> bool:
    """Do two templates render every probe conversation (with and without a generation prompt) the same?"""
    special = special or {"bos_token": "<s>", "eos_token": "</s>"}
    for conv in PROBE_CONVERSATIONS:
        for prompt_only in (False, True):
            msgs = conv[:-1] if prompt_only else conv
            try:
                if render(a, msgs, prompt_only, **special) != render(b, msgs, prompt_only, **special):
                    return False
            except Exception:  # a template that cannot render a probe is not the same template
                return False
    return True


@dataclass
class ChatTemplates:
    family: str  # a family name, "model" (the model's own, already marked) or a file path
    inference: str  # what runs and exports ship
    training: str  # the same with {% generation %} markers
    added_tokens: list[str] = field(default_factory=list)  # special tokens added to the vocabulary


def load_family(name: str) -> tuple[str, str]:
    inference, training = _family_files(name)
    return inference.read_text(), training.read_text()


def resolve(tokenizer, choice: str = "auto", need_markers: bool = True) -> ChatTemplates:
    """Pick the training template for this tokenizer; add ChatML tokens to a base model that has none.
    Without `need_markers` (data.assistant_only_loss: false), any template will do: every token is trained."""
    own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if choice.endswith((".jinja", ".j2")):
        path = Path(choice)
        if not path.is_file():
            raise FinetuneError(f"data.chat_template: file {choice} not found")
        training = path.read_text()
        if not has_markers(training) and need_markers:
            raise FinetuneError(
                f"data.chat_template: {choice} has no {{% generation %}} markers, so assistant tokens cannot be "
                "told apart; wrap each assistant message and its end-of-turn token in them, or set "
                "data.assistant_only_loss: false"
            )
        return ChatTemplates(str(path), strip_markers(training), training)
    if choice != "auto":
        if choice not in FAMILIES:
            raise FinetuneError(
                f"data.chat_template = {choice!r} is invalid: allowed: auto, {', '.join(FAMILIES)}, or a .jinja path"
            )
        inference, training = load_family(choice)
        return ChatTemplates(choice, inference, training, _add_missing_tokens(tokenizer, choice))
    if own is None:
        # A base model without a template gets plain ChatML; its tokens are added if the vocabulary lacks them.
        inference, training = load_family("chatml")
        return ChatTemplates("chatml", inference, training, _add_missing_tokens(tokenizer, "chatml"))
    if has_markers(own) or not need_markers:
        return ChatTemplates("model", strip_markers(own), own)
    special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    for name in FAMILIES:
        inference, training = load_family(name)
        if renders_identically(own, inference, special):
            return ChatTemplates(name, own, training)
    raise FinetuneError(
        "the model's chat template matches none of the known families "
        f"({', '.join(FAMILIES)}): set data.chat_template to one of them or to a .jinja file with "
        "{% generation %} markers, or set data.assistant_only_loss: false"
    )


def _add_missing_tokens(tokenizer, family: str) -> list[str]:
    if family not in ("chatml", "smollm2", "qwen2_5"):
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing


def end_of_turn_token_id(tokenizer, training_template: str) -> int:
    """The token that closes an assistant turn: the last token inside the generation markers."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "x"}]
    out = tokenizer.apply_chat_template(
        messages, chat_template=training_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    for token_id in reversed(masked):
        if tokenizer.decode([token_id]).strip():
            return token_id
    raise FinetuneError("the training chat template marks no assistant tokens")
