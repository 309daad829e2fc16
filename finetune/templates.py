"""Chat templates: the model's own (for inference and export) and how its assistant tokens are found (for loss masks).

Three routes, tried in this order for a model's own template (`data.chat_template: auto`):

1. markers: the template marks assistant tokens with `{% generation %}` (the model's own, one of our families, or
   the training twin TRL ships for a template byte-identical to one of its own: Gemma, Phi-3, Qwen3, DeepSeek,
   gpt-oss, Cohere, LFM2...). With the markers removed a training template renders byte-identically to the
   inference template (tests check this). The markers include each assistant turn's end-of-turn token.
2. prefix: any other template whose renderings of a conversation's prefixes are prefixes of each other. An
   assistant turn's text is the difference between rendering up to the generation prompt and rendering up to
   the end of that turn; it must end with an end-of-turn marker after the content. Checked per conversation.
3. otherwise a clear error naming data.chat_template.

Our own families: smollm2 (ChatML with SmolLM2's default system prompt), chatml (plain ChatML, given to base
models that have no template). Every template TRL ships with a training twin is a family too (qwen2_5, llama3,
qwen3, gemma3, phi3, ...).
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


OUR_FAMILIES = ("smollm2", "chatml")


def _trl_families() -> tuple[str, ...]:
    folder = _trl_dir()
    return tuple(sorted(p.name[: -len("_training.jinja")] for p in folder.glob("*_training.jinja")
                        if (folder / p.name.replace("_training.jinja", ".jinja")).is_file()))


FAMILIES = OUR_FAMILIES + _trl_families()
# Families a model's template is matched to by rendering the probe conversations the same (not byte for byte).
RENDER_MATCHED = ("smollm2", "chatml", "qwen2_5", "llama3")
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


# A tool call and its result: a template matched to a family must render these as the family does too (or both
# refuse them), or the tool calls would be trained in another format than the one that ships.
TOOL_PROBES = [[
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
    {"role": "tool", "name": "get_weather", "content": "-3 C"},
    {"role": "assistant", "content": "It is -3 C."},
]]


def _rendered(template: str, msgs, prompt_only: bool, special: dict) -> str | None:
    try:
        return render(template, msgs, prompt_only, **special)
    except Exception:  # noqa: BLE001 - templates raise what they like on conversations they refuse
        return None


def renders_identically(a: str, b: str, special: dict | None = None) -> bool:
    """Do two templates render every probe conversation (with and without a generation prompt) the same? A plain
    probe either cannot render is a difference; a tool probe both refuse is not."""
    special = special or {"bos_token": "<s>", "eos_token": "</s>"}
    for conv in PROBE_CONVERSATIONS + TOOL_PROBES:
        for prompt_only in (False, True):
            msgs = conv[:-1] if prompt_only else conv
            first, second = _rendered(a, msgs, prompt_only, special), _rendered(b, msgs, prompt_only, special)
            if first != second or (first is None and conv in PROBE_CONVERSATIONS):
                return False
    return True


@dataclass
class ChatTemplates:
    family: str  # a family name, "model" (the model's own), "model (prefix)" or a file path
    inference: str  # what runs and exports ship
    training: str  # the same with {% generation %} markers (route "markers"), or the inference template itself
    added_tokens: list[str] = field(default_factory=list)  # special tokens added to the vocabulary
    route: str = "markers"  # how assistant tokens are found: "markers" or "prefix"


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
        if has_markers(training) or not need_markers:
            return ChatTemplates(str(path), strip_markers(training), training)
        _check_prefix_route(tokenizer, training, f"data.chat_template: {choice}")
        return ChatTemplates(str(path), training, training, route="prefix")
    if choice != "auto":
        if choice not in FAMILIES:
            raise FinetuneError(
                f"data.chat_template = {choice!r} is invalid: allowed: auto, a .jinja path, or a family: "
                f"{', '.join(FAMILIES)}"
            )
        inference, training = load_family(choice)
        return ChatTemplates(choice, inference, training, _add_missing_tokens(tokenizer, choice))
    if own is None:
        # A base model without a template gets plain ChatML; its tokens are added if the vocabulary lacks them.
        inference, training = load_family("chatml")
        return ChatTemplates("chatml", inference, training, _add_missing_tokens(tokenizer, "chatml"))
    if has_markers(own) or not need_markers:
        return ChatTemplates("model", strip_markers(own), own)
    trl_name = _trl_family_of(own)
    if trl_name is not None:
        return ChatTemplates(trl_name, own, load_family(trl_name)[1])
    special = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
    for name in RENDER_MATCHED:
        inference, training = load_family(name)
        if renders_identically(own, inference, special):
            return ChatTemplates(name, own, training)
    _check_prefix_route(tokenizer, own, "the model's chat template")
    return ChatTemplates("model (prefix)", own, own, route="prefix")


def _trl_family_of(template: str) -> str | None:
    """The TRL family whose inference template is byte-identical to this one (what TRL's
    get_training_chat_template patches), or None."""
    for name in _trl_families():
        if (_trl_dir() / f"{name}.jinja").read_text() == template:
            return name
    return None


class NotPrefix(FinetuneError):
    """A conversation the prefix route cannot mask (its renderings are not prefixes of each other)."""


def _render_text(tokenizer, template: str, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, template: str, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it: from the end of the
    rendering up to that turn's generation prompt to the end of the rendering up to that turn. Raises NotPrefix
    where the renderings are not prefixes of each other, or a turn has no end-of-turn marker after its content."""
    full = _render_text(tokenizer, template, messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_text(tokenizer, template, messages[:i], True)
        through = _render_text(tokenizer, template, messages[: i + 1], False) if i + 1 < len(messages) else full
        if not through.startswith(before):
            raise NotPrefix(
                f"the chat template's generation prompt before message {i} (assistant) is not how it renders that "
                "turn's start (e.g. it opens a think block the rendered turn lacks)"
            )
        if not full.startswith(through):
            raise NotPrefix(
                f"the chat template renders message {i} (assistant) differently once the conversation goes on "
                "(its renderings of the conversation's prefixes are not prefixes of each other)"
            )
        turn = through[len(before):]
        content = (message.get("content") or "").strip()
        after = turn[turn.rfind(content) + len(content):] if content and content in turn else ""
        if content and not after.strip():
            raise NotPrefix(f"the chat template closes message {i} (assistant) with no end-of-turn marker, so a "
                            "trained model would not learn to stop")
        spans.append((len(before), len(through)))
    return full, spans


def prefix_masked(tokenizer, template: str, messages) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask by the prefix route: the rendered conversation tokenized as one text (as TRL
    does with markers), a token trained when it starts inside an assistant turn's span."""
    full, spans = assistant_spans(tokenizer, template, messages)
    if not tokenizer.is_fast:
        raise FinetuneError("the prefix route needs a fast tokenizer (its character offsets); set data.chat_template "
                            "to a template with {% generation %} markers")
    out = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= start < b for a, b in spans)) for start, _ in out["offset_mapping"]]
    return list(out["input_ids"]), mask


def _check_prefix_route(tokenizer, template: str, what: str) -> None:
    """Can the prefix route mask this template? Tried on fixed conversations; a clear error if not."""
    try:
        for conversation in PROBE_CONVERSATIONS:
            assistant_spans(tokenizer, template, conversation)
    except NotPrefix as e:
        raise FinetuneError(
            f"{what} has no {{% generation %}} markers, is not one TRL ships a training version of, and cannot be "
            f"masked by rendering prefixes: {e}. Set data.chat_template to a family ({', '.join(OUR_FAMILIES)}, "
            "qwen3, gemma3, llama3, ...) or to a .jinja file with {% generation %} markers around each assistant "
            "turn and its end-of-turn token, or set data.assistant_only_loss: false"
        ) from None
    except Exception as e:  # the template cannot render plain user/assistant turns at all
        roles = "/".join(m["role"] for m in conversation)
        raise FinetuneError(f"{what} cannot render a plain {roles} conversation ({type(e).__name__}: {e}); set "
                            "data.chat_template to a family or a .jinja file") from None


def masked(tokenizer, chat: ChatTemplates, messages) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask (1 = trained) of one conversation, by the template's route."""
    if chat.route == "prefix":
        return prefix_masked(tokenizer, chat.training, messages)
    out = tokenizer.apply_chat_template(messages, chat_template=chat.training, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _add_missing_tokens(tokenizer, family: str) -> list[str]:
    if CHATML_TOKENS[0] not in load_family(family)[0]:
        return []
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return missing


def end_of_turn_token_id(tokenizer, training_template: str) -> int:
    """The token that closes an assistant turn: the last token inside the generation markers, or (a template
    without markers) the first token after the answer's content in its turn."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "x"}]
    if not has_markers(training_template):
        full, spans = assistant_spans(tokenizer, training_template, messages[:2])
        turn = full[spans[0][0]:spans[0][1]]
        after = turn[turn.rfind("ok") + 2:]
        for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if tokenizer.decode([token_id]).strip():
                return token_id
        raise FinetuneError("the chat template closes no assistant turn with an end-of-turn marker")
    out = tokenizer.apply_chat_template(
        messages, chat_template=training_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    for token_id in reversed(masked):
        if tokenizer.decode([token_id]).strip():
            return token_id
    raise FinetuneError("the training chat template marks no assistant tokens")
