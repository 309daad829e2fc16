"""Rewards for online RL (grpo, rloo) and for scoring answers: rule functions and learned reward models.

    rewards:                              # in a grpo/rloo recipe
      - {function: exact_match, weight: 1.0}
      - {model: runs/smollm2-135m-reward, weight: 0.5}

Rule functions take TRL's reward-function arguments (`prompts`, `completions`, and the dataset's columns:
`reference` is the data row's last assistant turn, `pattern` its dataset's `adherence_regex`) and return one
float per completion. A reward model is a sequence classifier with one output: a `stage: reward` run
directory (base + adapter + trained score head, merged here into one plain model, since TRL's GRPO/RLOO set
up tokenizers and devices only for a PreTrainedModel) or an exported reward model folder. It scores the
prompt and completion rendered with the chat template it was trained with, exactly as `score` does.
"""

from __future__ import annotations

from pathlib import Path

from finetune import metrics
from finetune.errors import FinetuneError


def _text(completion) -> str:
    """A completion as text: TRL passes conversational completions as a list of messages."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def exact_match(completions, reference, **kwargs) -> list[float]:
    """1.0 when the answer equals the reference answer (surrounding whitespace ignored), else 0.0: compare's
    exact-match metric."""
    return [metrics.exact_match(_text(c), str(r)) for c, r in zip(completions, reference)]


def format_match(completions, pattern, **kwargs) -> list[float]:
    """1.0 when the whole answer matches the dataset's adherence_regex (checked when the stage loads its data),
    else 0.0: compare's format-adherence metric."""
    return [float(metrics.adheres(_text(c), p)) for c, p in zip(completions, pattern)]


def length(completions, reference, **kwargs) -> list[float]:
    """1.0 for an answer no longer than the reference, falling linearly to 0.0 at twice its length."""
    out = []
    for c, r in zip(completions, reference):
        n, limit = len(_text(c).strip()), max(1, len(str(r).strip()))
        out.append(max(0.0, min(1.0, 2.0 - n / limit)))
    return out


def functions() -> dict:
    """Rule rewards by the name a recipe uses."""
    return {"exact_match": exact_match, "format": format_match, "length": length}


def check_function_name(name: str, where: str) -> None:
    if name not in functions():
        raise FinetuneError(f"{where} = {name!r} is not a reward function; known: {', '.join(functions())}")


# ----------------------------------------------------------------------------- reward models


def check_source(spec: str) -> dict | None:
    """Refuse, before any loading, what cannot be a reward model: a missing path, a run that is not a completed
    reward run, a model folder that is not a one-output sequence classifier. Returns a run's run.json."""
    from finetune import models
    from finetune.rundir import read_completed_run

    path = Path(spec).expanduser()
    if (path / "run.json").is_file():
        run = read_completed_run(path, what="reward model")
        if run.get("stage") != "reward":
            raise FinetuneError(
                f"{spec}: run of stage {run.get('stage')!r}, not a reward model; train one with `stage: reward`"
            )
        return run
    config = _config(models.resolve_model(spec), spec)
    architectures = getattr(config, "architectures", None) or []
    if (getattr(config, "num_labels", None) != 1
            or not any(a.endswith("ForSequenceClassification") for a in architectures)):
        raise FinetuneError(
            f"{spec}: not a reward model: a reward source is a sequence classifier with one output "
            f"(num_labels 1); this one is {architectures or 'unknown'} with {getattr(config, 'num_labels', '?')} "
            "outputs. Give a `stage: reward` run directory or its export"
        )
    return None


def load_reward_model(spec: str, dtype=None, trust_remote_code: bool = False):
    """A one-output sequence classifier and its tokenizer, from a reward run directory or a model folder.

    A run's base is loaded in full precision (not as trained in 4 bits) and its adapter and score head merged,
    so that the result is a plain PreTrainedModel. A model's own Python code runs only with `trust_remote_code`
    (and a run's only if its recipe trusted it too: finetune/trust.py)."""
    import torch

    from finetune import models, trust

    dtype = dtype or torch.float32
    path = Path(spec).expanduser()
    run = check_source(spec)
    if run is not None:
        from peft import PeftModel

        adapter_dir = path / run.get("adapter", "adapter")
        trusted = trust.check_run_code(run, path, trust_remote_code)
        trust.check_adapter_folder(adapter_dir, "reward model's adapter")
        tokenizer = models.load_tokenizer(str(adapter_dir), trusted)
        base = models.load_model(models.model_config(run["recipe"]["model"]), None, run["base_model"]["path"]
                                 if Path(run["base_model"].get("path") or "").is_dir() else None, dtype=dtype,
                                 task="seq_cls")
        if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    else:
        source = models.resolve_model(spec)
        tokenizer = models.load_tokenizer(source, trust_remote_code)
        model = models.load_model(models.model_config({"name": source, "trust_remote_code": trust_remote_code}), None,
                                  source, dtype=dtype, task="seq_cls")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def _config(source: str, spec: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise FinetuneError(f"{spec}: cannot read the model config: {e}") from None


def render(tokenizer, conversation: list[dict]) -> str:
    """A whole conversation as the reward model reads it: its chat template, no generation prompt."""
    if isinstance(tokenizer.chat_template, str):
        return tokenizer.apply_chat_template(conversation, tokenize=False)
    return "\n\n".join(m["content"] for m in conversation)


def score(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
    """One score per conversation (prompt turns + answer), batched with right padding as TRL's GRPO does."""
    import torch

    scores = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(conversations), batch_size):
            texts = [render(tokenizer, c) for c in conversations[i:i + batch_size]]
            batch = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right",
                              add_special_tokens=False).to(device)
            scores += model(**batch).logits[:, 0].float().tolist()
    return scores


def build(sources) -> tuple[list, list]:
    """TRL's reward_funcs and reward_processing_classes for a recipe's `rewards` (weights: GRPOConfig's)."""
    funcs, processing = [], []
    for source in sources:
        if source.function is not None:
            funcs.append(functions()[source.function])
            processing.append(None)
        else:
            model, tokenizer = load_reward_model(source.model)
            funcs.append(model)
            processing.append(tokenizer)
    return funcs, processing
