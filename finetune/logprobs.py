"""Log-probabilities of answers under a model: the held-out preference figures of the dpo and kto stages.

`completion_logps` renders each prompt with the tokenizer's chat template and a generation prompt, appends
the answer as the template renders it (its end-of-turn token included), and sums the model's log-probabilities
of the answer tokens. `preference_figures` turns those into what a preference stage reports: the share of
held-out pairs where log p(chosen) > log p(rejected), and the mean margin, overall and per rejection type
(log-probabilities favour shorter texts, so a type whose rejected answers are longer says little).
"""

from __future__ import annotations

from collections import defaultdict


def _answer_ids(tokenizer, prompt: list[dict], answer: list[dict]) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template([*prompt, *answer], tokenize=True, return_dict=True)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:  # templates that rewrite earlier turns: take the common prefix
        n = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b), len(prompt_ids))
        prompt_ids = full_ids[:n]
    return list(prompt_ids), list(full_ids[len(prompt_ids):])


def completion_logps(model, tokenizer, prompts: list[list[dict]], answers: list[list[dict]],
                     batch_size: int = 8) -> list[float]:
    """Sum of log p(answer token | everything before it), one float per (prompt, answer)."""
    import torch

    model_device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = [_answer_ids(tokenizer, p, a) for p, a in zip(prompts, answers)]
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                width = max(len(p) + len(a) for p, a in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for i, (p, a) in enumerate(chunk):
                    ids[i, : len(p) + len(a)] = torch.tensor(p + a)
                    mask[i, : len(p) + len(a)] = 1
                logits = model(input_ids=ids.to(model_device), attention_mask=mask.to(model_device)).logits.float()
                logp = torch.log_softmax(logits[:, :-1], -1).gather(
                    -1, ids[:, 1:].to(model_device).unsqueeze(-1))[..., 0]
                for i, (p, a) in enumerate(chunk):
                    out.append(logp[i, len(p) - 1 : len(p) + len(a) - 1].sum().item())
    finally:
        model.train(was_training)
    return out


def preference_figures(model, tokenizer, pairs) -> dict:
    """Held-out pairs (prompt, chosen, rejected, kind): accuracy of log p(chosen) > log p(rejected) and the mean
    margin log p(chosen) - log p(rejected), overall and per kind."""
    rows = list(pairs)
    return pair_summary(preference_margins(model, tokenizer, rows), rows)


def preference_margins(model, tokenizer, rows: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair."""
    chosen = completion_logps(model, tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = completion_logps(model, tokenizer, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
    return [c - r for c, r in zip(chosen, rejected)]


def pair_summary(margins: list[float], rows: list[dict]) -> dict:
    """Share of pairs with a positive margin (chosen over rejected) and the mean margin, overall and per kind."""
    by_kind = defaultdict(list)
    for row, margin in zip(rows, margins):
        by_kind[row.get("kind") or "all"].append(margin)
    return {
        "pairs": len(rows),
        "accuracy": round(sum(m > 0 for m in margins) / max(1, len(margins)), 4),
        "mean_margin": round(sum(margins) / max(1, len(margins)), 4),
        "per_type": {kind: {"pairs": len(ms), "accuracy": round(sum(m > 0 for m in ms) / len(ms), 4),
                            "mean_margin": round(sum(ms) / len(ms), 4)} for kind, ms in sorted(by_kind.items())},
    }
