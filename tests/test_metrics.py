"""Tests for finetune.metrics, against values worked out by hand."""

import pytest

from finetune.errors import FinetuneError
from finetune.metrics import (
    HIGHER_IS_BETTER,
    METRIC_LABELS,
    RATE_METRICS,
    adheres,
    exact_match,
    has_reference,
    repetition_rate,
    rouge_l,
    summarize,
    token_f1,
)

# --- exact_match -------------------------------------------------------------


def test_exact_match_ignores_surrounding_whitespace():
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("Paris", "\tParis  ") == 1.0


def test_exact_match_is_otherwise_strict():
    assert exact_match("paris", "Paris") == 0.0  # case counts
    assert exact_match("Paris.", "Paris") == 0.0  # punctuation counts
    assert exact_match("Par is", "Paris") == 0.0  # inner whitespace counts


# --- token_f1 ----------------------------------------------------------------


def test_token_f1_partial_overlap():
    # pred {the, cat, sat}, ref {the, cat, ran}: 2 common tokens.
    # P = 2/3, R = 2/3 -> F1 = 2 * (2/3)(2/3) / (4/3) = 2/3.
    assert token_f1("the cat sat", "the cat ran") == pytest.approx(2 / 3)


def test_token_f1_normalises_case_and_punctuation():
    # "The cat, sat!" -> [the, cat, sat], identical to the reference.
    assert token_f1("The cat, sat!", "the cat sat") == 1.0


def test_token_f1_counts_repeated_tokens_once_per_reference_occurrence():
    # pred [a, a, a, b], ref [a, b]: common = min(3, 1) + min(1, 1) = 2.
    # P = 2/4 = 1/2, R = 2/2 = 1 -> F1 = 2 * (1/2)(1) / (3/2) = 2/3.
    assert token_f1("a a a b", "a b") == pytest.approx(2 / 3)


def test_token_f1_unequal_lengths():
    # pred [i, think, the, answer, is, c] (6), ref [c] (1): 1 common.
    # P = 1/6, R = 1 -> F1 = 2 * (1/6) / (7/6) = 2/7.
    assert token_f1("I think the answer is C.", "C") == pytest.approx(2 / 7)


def test_token_f1_no_overlap_and_empty_sides():
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "cat") == 0.0
    assert token_f1("cat", "") == 0.0
    # Only punctuation normalises to nothing.
    assert token_f1("?!", "cat") == 0.0
    assert token_f1("?!", "") == 1.0


# --- rouge_l -----------------------------------------------------------------


def test_rouge_l_same_length():
    # pred [the cat sat on the mat], ref [the cat lay on the mat].
    # LCS = "the cat on the mat" = 5; P = 5/6, R = 5/6 -> F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)


def test_rouge_l_different_lengths():
    # pred [a b c d] (4), ref [a c e] (3): LCS = "a c" = 2.
    # P = 2/4 = 1/2, R = 2/3 -> F = 2 * (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7.
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)


def test_rouge_l_identical_disjoint_and_empty():
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)  # lowercased
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("", "cat") == 0.0


# --- repetition_rate ---------------------------------------------------------


def test_repetition_rate_repeated_block():
    # 4-grams of [1,2,3,4,1,2,3,4]: (1234) (2341) (3412) (4123) (1234)
    # -> 5 n-grams, 4 distinct -> 1 - 4/5 = 0.2.
    assert repetition_rate([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(0.2)


def test_repetition_rate_loop_with_bigrams():
    # Bigrams of [7]*6: five times (7,7) -> 1 distinct of 5 -> 1 - 1/5 = 0.8.
    assert repetition_rate([7] * 6, n=2) == pytest.approx(0.8)


def test_repetition_rate_short_and_distinct():
    assert repetition_rate([1, 2, 3]) == 0.0  # fewer than 4 tokens
    assert repetition_rate([]) == 0.0
    assert repetition_rate([1, 2, 3, 4]) == 0.0  # one 4-gram, 1 distinct
    assert repetition_rate(list(range(20))) == 0.0


def test_repetition_rate_rejects_bad_n():
    with pytest.raises(ValueError):
        repetition_rate([1, 2, 3], n=0)


# --- adheres -----------------------------------------------------------------


def test_adheres_full_match_after_strip():
    assert adheres("  Answer: B\n", r"Answer: [A-D]")
    assert not adheres("Answer: B because ...", r"Answer: [A-D]")  # must match all
    assert not adheres("So, Answer: B", r"Answer: [A-D]")


def test_adheres_dot_matches_newline():
    assert adheres("line one\nline two", r"line one.line two")
    assert adheres('{\n  "a": 1\n}', r"\{.*\}")


# --- has_reference -----------------------------------------------------------


def test_has_reference():
    assert has_reference("x")
    assert not has_reference(None)
    assert not has_reference("   ")


# --- summarize ---------------------------------------------------------------


def _outputs():
    return [
        # 3 tokens, EOS, all distinct -> repetition 0.
        {"text": "Answer: A", "token_ids": [1, 2, 3], "stopped": True},
        # 5 tokens, EOS; 4-grams (5555) (5555) -> 2, 1 distinct -> 1 - 1/2 = 0.5.
        {"text": "Answer: B", "token_ids": [5, 5, 5, 5, 5], "stopped": True},
        # 10 tokens, hit the limit, all distinct -> repetition 0.
        {"text": "I think the answer is C", "token_ids": list(range(1, 11)), "stopped": False},
    ]


def test_summarize_basic_metrics():
    s = summarize(_outputs())
    assert list(s) == ["n", "stop_rate", "mean_length", "median_length", "repetition_rate"]
    assert s["n"] == 3
    assert s["stop_rate"] == pytest.approx(2 / 3)  # 2 of 3 stopped
    assert s["mean_length"] == pytest.approx(6.0)  # (3 + 5 + 10) / 3 = 18 / 3
    assert s["median_length"] == 5.0  # sorted 3, 5, 10
    assert s["repetition_rate"] == pytest.approx(1 / 6)  # (0 + 0.5 + 0) / 3


def test_summarize_all_options():
    s = summarize(
        _outputs(),
        references=["Answer: A", None, "C"],
        adherence_regex=r"Answer: [A-D]",
        rewards=[1.0, 0.0, 0.5],
    )
    assert list(s) == [
        "n", "stop_rate", "mean_length", "median_length", "repetition_rate",
        "adherence", "exact_match", "token_f1", "rouge_l", "reward",
    ]  # fmt: skip
    # "Answer: A" and "Answer: B" match, the third does not -> 2/3.
    assert s["adherence"] == pytest.approx(2 / 3)
    # Only rows 1 and 3 have a reference.
    # Row 1: identical -> EM 1, F1 1, ROUGE-L 1.
    # Row 3: "I think the answer is C" vs "C": EM 0; F1 = ROUGE-L = 2/7
    #   (1 common token of 6 predicted and 1 reference: P = 1/6, R = 1).
    assert s["exact_match"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert s["token_f1"] == pytest.approx(9 / 14)  # (1 + 2/7) / 2
    assert s["rouge_l"] == pytest.approx(9 / 14)
    assert s["reward"] == pytest.approx(0.5)  # (1 + 0 + 0.5) / 3


def test_summarize_omits_reference_metrics_without_references():
    s = summarize(_outputs(), references=[None, "", None])
    assert "exact_match" not in s and "token_f1" not in s and "rouge_l" not in s


def test_summarize_even_count_median():
    outs = [
        {"text": "a", "token_ids": [1, 2], "stopped": True},
        {"text": "b", "token_ids": [1, 2, 3, 4], "stopped": True},
    ]
    assert summarize(outs)["median_length"] == 3.0  # (2 + 4) / 2


def test_summarize_empty_and_mismatched_inputs():
    assert summarize([]) == {"n": 0}
    with pytest.raises(ValueError):
        summarize(_outputs(), references=["x"])
    with pytest.raises(ValueError):
        summarize(_outputs(), rewards=[1.0, 2.0])


def test_summarize_bad_regex_is_a_user_error():
    with pytest.raises(FinetuneError, match="adherence regex"):
        summarize(_outputs(), adherence_regex="Answer: [A-D")


def test_rates_are_fractions():
    s = summarize(_outputs(), references=["Answer: A", None, "C"], adherence_regex=".*")
    for key in RATE_METRICS & s.keys():
        assert 0.0 <= s[key] <= 1.0


# --- labels ------------------------------------------------------------------


def test_every_summarize_metric_has_a_label_and_direction():
    s = summarize(_outputs(), references=["a", "b", "c"], adherence_regex=".*", rewards=[0, 0, 0])
    for key in s:
        assert key in METRIC_LABELS
        assert key in HIGHER_IS_BETTER
    assert HIGHER_IS_BETTER["repetition_rate"] is False
    assert HIGHER_IS_BETTER["token_f1"] is True
    assert HIGHER_IS_BETTER["mean_length"] is None


def test_turn_end_rate_counts_only_answers_closed_by_the_end_of_turn_token():
    outputs = [
        {"text": "a", "token_ids": [1], "stopped": True, "ended_turn": True},
        {"text": "b", "token_ids": [2], "stopped": True, "ended_turn": False},  # a plain end of text
        {"text": "c", "token_ids": [3], "stopped": False, "ended_turn": False},
    ]
    s = summarize(outputs)
    assert list(s)[:3] == ["n", "stop_rate", "turn_end_rate"]
    assert s["stop_rate"] == pytest.approx(2 / 3) and s["turn_end_rate"] == pytest.approx(1 / 3)
