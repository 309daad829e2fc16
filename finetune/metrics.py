"""Text metrics for comparing generations of a base and a fine-tuned model.

Everything here is pure Python on strings and token ids: no model is loaded,
so ``finetune compare`` / ``finetune eval`` can score outputs cheaply after
generation, and the functions are easy to test against hand-worked values.

Per-row metrics:

* :func:`exact_match`    -- strict equality after trimming whitespace.
* :func:`token_f1`       -- SQuAD-style bag-of-tokens F1.
* :func:`rouge_l`        -- ROUGE-L F-measure (longest common subsequence).
* :func:`repetition_rate` -- share of repeated n-grams in the generated ids,
  a cheap detector of the "looping" typical of base models.
* :func:`adheres`        -- whether an output matches a required format.

:func:`summarize` aggregates them over one model's outputs into the dict
that the report and the terminal table show.
"""

from __future__ import annotations

import functools
import re
import statistics
import string
from collections import Counter
from typing import Any

from finetune.errors import FinetuneError

__all__ = [
    "METRIC_LABELS",
    "HIGHER_IS_BETTER",
    "RATE_METRICS",
    "exact_match",
    "token_f1",
    "rouge_l",
    "repetition_rate",
    "adheres",
    "has_reference",
    "reference_scores",
    "summarize",
]

# Short human labels, in the order the metrics appear in summarize()'s dict
# (the report and the terminal table list rows in this order).
METRIC_LABELS: dict[str, str] = {
    "n": "Prompts",
    "stop_rate": "Stopped (EOS)",
    "turn_end_rate": "Ended its turn",
    "mean_length": "Mean length (tokens)",
    "median_length": "Median length (tokens)",
    "repetition_rate": "Repeated 4-grams",
    "adherence": "Format adherence",
    "exact_match": "Exact match",
    "token_f1": "Token F1",
    "rouge_l": "ROUGE-L",
    "reward": "Mean reward",
}

# True: higher is better; False: lower is better; None: descriptive only
# (a longer answer is neither better nor worse by itself).
HIGHER_IS_BETTER: dict[str, bool | None] = {
    "n": None,
    "stop_rate": True,
    "turn_end_rate": True,
    "mean_length": None,
    "median_length": None,
    "repetition_rate": False,
    "adherence": True,
    "exact_match": True,
    "token_f1": True,
    "rouge_l": True,
    "reward": True,
}

# Metrics that are fractions in [0, 1]; displays show them as percentages.
RATE_METRICS: frozenset[str] = frozenset(
    {"stop_rate", "turn_end_rate", "repetition_rate", "adherence", "exact_match", "token_f1", "rouge_l"}
)

# str.translate table that deletes ASCII punctuation (used by token_f1).
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(pred: str, ref: str) -> float:
    """1.0 if ``pred`` and ``ref`` are equal after stripping surrounding
    whitespace, else 0.0. Case and punctuation still count."""
    return 1.0 if pred.strip() == ref.strip() else 0.0


def _f1_tokens(text: str) -> list[str]:
    """Normalise ``text`` for :func:`token_f1`: lowercase, delete ASCII
    punctuation, split on whitespace."""
    return text.lower().translate(_PUNCT_TABLE).split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token F1 between a prediction and a reference.

    Normalisation (applied to both sides): lowercase, delete ASCII punctuation
    (``string.punctuation``), then split on whitespace. Unlike the SQuAD
    script, articles ("a", "an", "the") are kept, so
    ``token_f1("the cat sat", "the cat ran") == 2/3``.

    Tokens are compared as multisets: a token repeated in the prediction only
    counts as often as it occurs in the reference.

    Returns 1.0 when both sides are empty after normalisation, 0.0 when only
    one of them is.
    """
    pred_tokens = _f1_tokens(pred)
    ref_tokens = _f1_tokens(ref)
    if not pred_tokens or not ref_tokens:
        return 1.0 if pred_tokens == ref_tokens else 0.0
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # Imported lazily and built once: the scorer is reused for every row.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure from the ``rouge_score`` package (no stemming).

    ``rouge_score`` lowercases and keeps only ``[a-z0-9]+`` tokens, so text
    without ASCII letters or digits (e.g. Chinese) scores 0.0, as does an
    empty side. We call the package directly rather than
    ``evaluate.load("rouge")``, which would fetch code from a hub.
    """
    # RougeScorer.score takes (target, prediction), in that order.
    return float(_rouge_scorer().score(ref, pred)["rougeL"].fmeasure)


def repetition_rate(token_ids: list[int], n: int = 4) -> float:
    """Share of repeated n-grams: ``1 - distinct n-grams / all n-grams``.

    0.0 means no n-gram occurs twice; values near 1.0 mean the output loops.
    Returns 0.0 when there are fewer than ``n`` tokens (no n-gram at all).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ngrams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    if not ngrams:
        return 0.0
    return 1.0 - len(set(ngrams)) / len(ngrams)


def adheres(text: str, pattern: str) -> bool:
    """True if the whole of ``text`` (whitespace-stripped) matches the regex
    ``pattern``; ``.`` also matches newlines (``re.DOTALL``)."""
    return re.fullmatch(pattern, text.strip(), re.DOTALL) is not None


def has_reference(ref: str | None) -> bool:
    """Whether a row has a usable reference. ``None`` and blank strings count
    as "no reference": scoring against an empty string means nothing."""
    return ref is not None and ref.strip() != ""


def reference_scores(pred: str, ref: str) -> dict[str, float]:
    """The reference-based metrics for one row, keyed like summarize()."""
    return {
        "exact_match": exact_match(pred, ref),
        "token_f1": token_f1(pred, ref),
        "rouge_l": rouge_l(pred, ref),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _check_length(name: str, values: list | None, expected: int) -> None:
    if values is not None and len(values) != expected:
        raise ValueError(f"{name} has {len(values)} entries, expected {expected} (one per output)")


def _check_regex(pattern: str) -> None:
    # The pattern comes from the user (CLI flag or recipe): report a bad one
    # as a user error rather than a re.error traceback.
    try:
        re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise FinetuneError(
            f"adherence regex {pattern!r} is not a valid Python regular expression: {e}. "
            "Fix the pattern (it must match the whole stripped output)."
        ) from e


def summarize(
    outputs: list[dict],
    references: list[str | None] | None = None,
    adherence_regex: str | None = None,
    rewards: list[float] | None = None,
) -> dict[str, float]:
    """Aggregate metrics over one model's outputs.

    Each output is a dict with ``text`` (str), ``token_ids`` (generated ids,
    without the EOS) and ``stopped`` (True if EOS came before
    ``max_new_tokens``). ``references`` and ``rewards``, when given, hold one
    entry per output, in the same order.

    Returns a dict in this order (keys are omitted when their input is
    missing):

    * ``n``: number of outputs;
    * ``stop_rate``: fraction that emitted EOS;
    * ``turn_end_rate``: fraction that stopped with the chat template's end-of-turn token (when the outputs say,
      in ``ended_turn``: chat prompts of a template whose end-of-turn token is known);
    * ``mean_length`` / ``median_length``: generated tokens;
    * ``repetition_rate``: mean of :func:`repetition_rate` (n=4);
    * ``adherence``: fraction matching ``adherence_regex`` (if given);
    * ``exact_match`` / ``token_f1`` / ``rouge_l``: means over the rows that
      have a reference (see :func:`has_reference`); omitted if none has one;
    * ``reward``: mean of ``rewards`` (if given).

    With no outputs, only ``{"n": 0}`` is returned.

    Raises:
        ValueError: if ``references`` or ``rewards`` has the wrong length.
        FinetuneError: if ``adherence_regex`` is not a valid regex.
    """
    n = len(outputs)
    _check_length("references", references, n)
    _check_length("rewards", rewards, n)
    if adherence_regex is not None:
        _check_regex(adherence_regex)
    if n == 0:
        return {"n": 0}

    lengths = [len(o["token_ids"]) for o in outputs]
    result: dict[str, float] = {
        "n": n,
        "stop_rate": _mean([1.0 if o["stopped"] else 0.0 for o in outputs]),
    }
    if all("ended_turn" in o for o in outputs):
        result["turn_end_rate"] = _mean([1.0 if o["ended_turn"] else 0.0 for o in outputs])
    result.update({
        "mean_length": _mean(lengths),
        "median_length": float(statistics.median(lengths)),
        "repetition_rate": _mean([repetition_rate(o["token_ids"]) for o in outputs]),
    })
    if adherence_regex is not None:
        result["adherence"] = _mean(
            [1.0 if adheres(o["text"], adherence_regex) else 0.0 for o in outputs]
        )
    if references is not None:
        scored = [
            reference_scores(o["text"], ref)
            for o, ref in zip(outputs, references)
            if has_reference(ref)
        ]
        if scored:
            for key in ("exact_match", "token_f1", "rouge_l"):
                result[key] = _mean([s[key] for s in scored])
    if rewards is not None:
        result["reward"] = _mean([float(r) for r in rewards])
    return result
