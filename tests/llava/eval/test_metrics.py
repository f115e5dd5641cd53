"""Metrics on hand-computed cases, corner cases included."""
import math

import pytest

from llava.eval.metrics import (
    METRICS,
    anls,
    bootstrap_ci,
    cider,
    exact_match,
    levenshtein,
    relaxed_accuracy,
    squad_normalize,
    stratified_bootstrap_ci,
    token_f1,
    vqa_accuracy,
    vqa_normalize,
)

# ---------------------------------------------------------------------------------------------- relaxed accuracy


@pytest.mark.parametrize(
    "pred, target, expected",
    [
        ("12", "12", 1.0),
        ("12.5", "12", 1.0),  # 4.2% off
        ("12.7", "12", 0.0),  # 5.8% off
        ("12.6", "12", 1.0),  # exactly 5% (tolerance is inclusive)
        ("-10.4", "-10", 1.0),  # relative to |target|
        ("12 kg", "12", 0.0),  # units are not stripped: compared as strings
        ("45%", "0.45", 1.0),  # a percentage is a fraction
        ("0.45", "45%", 1.0),
        ("45%", "45", 0.0),
        ("45", "45%", 0.0),
        ("45 %", "45%", 1.0),
        ("0", "0", 1.0),  # zero target: exact equality, numerically
        ("0.0", "0", 1.0),
        ("0.01", "0", 0.0),
        ("1,000", "1000", 0.0),  # a thousands separator makes a string
        ("1,000", "1,000", 1.0),
        ("Yes", "yes", 1.0),  # strings: case-insensitive equality
        (" yes. ", "Yes", 1.0),  # whitespace and one trailing period stripped
        ("12.", "12", 1.0),
        ("the USA", "USA", 0.0),  # no article dropping in ChartQA
        ("", "12", 0.0),
        ("", "", 1.0),
        ("inf", "inf", 1.0),  # not a number here: equal strings
        ("nan", "nan", 1.0),
        ("1e3", "1000", 1.0),
    ],
)
def test_relaxed_accuracy(pred, target, expected):
    assert relaxed_accuracy(pred, target) == expected


def test_relaxed_accuracy_list_of_targets_is_max():
    assert relaxed_accuracy("7", ["5", "7"]) == 1.0
    assert relaxed_accuracy("7", []) == 0.0


# --------------------------------------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("same", "same") == 0


def test_anls_hand_cases():
    assert anls("Hello", ["hello"]) == 1.0  # lower-cased
    assert anls("  hello   world ", ["Hello World"]) == 1.0  # stripped, whitespace collapsed
    assert anls("abcd", ["abcx"]) == pytest.approx(0.75)  # NL = 1/4
    assert anls("abcde", ["abcxy"]) == pytest.approx(0.6)  # NL = 2/5
    assert anls("abcd", ["abxy"]) == 0.0  # NL exactly τ = 0.5 -> 0
    assert anls("abcd", ["abxy"], tau=0.51) == pytest.approx(0.5)
    assert anls("abcd", ["wxyz", "abcx", "abcd e"]) == pytest.approx(0.75)  # max over answers (abcd e: NL 2/6)
    assert anls("", ["abc"]) == 0.0  # empty prediction
    assert anls("", [""]) == 1.0
    assert anls("abc", []) == 0.0


# -------------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Two", "2"),
        ("two dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the official map stops at ten
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("The cat", "cat"),
        ("a man", "man"),
        ("an apple", "apple"),
        ("theater", "theater"),  # articles are whole words only
        ("yes!", "yes"),
        ("yes.", "yes"),
        ("1.5", "1.5"),  # decimal point kept
        (".5", ".5"),
        ("5.", "5"),
        ("u.s.a.", "usa"),
        ("1,000", "1000"),  # a digit-comma-digit deletes punctuation
        ("1,000 cars, red", "1000 cars red"),
        ("red, white", "red white"),  # comma touching a space: deleted
        ("red,white", "red white"),  # otherwise: replaced by a space
        ("black-and-white", "black and white"),
        ("t - shirt", "t shirt"),
        ("line1\nline2\tend", "line1 line2 end"),
        ("  Yes  ", "yes"),
        ("man's", "man's"),  # apostrophes are not punctuation here
        ("", ""),
    ],
)
def test_vqa_normalize(raw, normal):
    assert vqa_normalize(raw) == normal


def test_vqa_accuracy_leave_one_out_counts():
    def answers(k):
        return ["2"] * k + ["3", "4", "5", "6", "7", "8", "9", "10", "11", "12"][: 10 - k]

    # k matches out of 10: each of the 10 leave-one-out subsets has k (dropped a non-match) or k-1 matches.
    assert vqa_accuracy("2", answers(0)) == 0.0
    assert vqa_accuracy("2", answers(1)) == pytest.approx(0.3)  # 9 subsets with 1 -> 1/3, 1 with 0
    assert vqa_accuracy("2", answers(2)) == pytest.approx(0.6)  # (8·2/3 + 2·1/3) / 10
    assert vqa_accuracy("2", answers(3)) == pytest.approx(0.9)  # (7·1 + 3·2/3) / 10
    assert vqa_accuracy("2", answers(4)) == 1.0
    assert vqa_accuracy("2", answers(10)) == 1.0


def test_vqa_accuracy_normalises_both_sides():
    humans = ["2"] * 5 + ["two"] * 3 + ["3", "4"]
    assert vqa_accuracy("Two.", humans) == 1.0  # "two" -> "2" on both sides: 8 matches
    assert vqa_accuracy("dont know", ["don't know"] * 10) == 1.0
    assert vqa_accuracy("The red car", ["red car"] * 2 + ["blue car"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("1.5", ["15"] * 10) == 0.0  # the decimal point is kept
    assert vqa_accuracy("", ["yes"] * 10) == 0.0  # empty prediction
    assert vqa_accuracy("yes", ["Yes"]) == 1.0  # single answer: exact match after normalisation
    assert vqa_accuracy("yes", []) == 0.0


# ---------------------------------------------------------------------------------------------- EM and token F1


def test_squad_normalize_and_exact_match():
    assert squad_normalize("The Red circle.") == "red circle"
    assert squad_normalize("  a  b!  ") == "b"
    assert exact_match("The red circle!", ["red circle"]) == 1.0
    assert exact_match("red", ["red circle"]) == 0.0
    assert exact_match("7", ["3", "7"]) == 1.0
    assert exact_match("", ["red"]) == 0.0
    assert exact_match("the", [""]) == 1.0  # both normalise to empty
    assert exact_match("two", ["2"]) == 0.0  # no number-word mapping in SQuAD normalisation


def test_token_f1():
    assert token_f1("red circle", ["red circle"]) == 1.0
    # pred {red}, gold {red, circle}: P = 1, R = 1/2 -> F1 = 2/3
    assert token_f1("red", ["red circle"]) == pytest.approx(2 / 3)
    # pred {big, red, square}, gold {red, circle}: P = 1/3, R = 1/2 -> F1 = 0.4
    assert token_f1("big red square", ["the red circle"]) == pytest.approx(0.4)
    assert token_f1("blue", ["red"]) == 0.0
    assert token_f1("", ["red"]) == 0.0
    assert token_f1("a", ["the"]) == 1.0  # both empty after normalisation
    assert token_f1("red", ["blue", "red square"]) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------------- CIDEr-D


def test_cider_identical_four_words_is_ten():
    # Two images with disjoint words: every n-gram has df = 1, weight log 2; identical texts give cosine 1 at
    # all four orders and no length penalty -> 10 × mean(1, 1, 1, 1) = 10.
    refs = {"1": ["a b c d"], "2": ["e f g h"]}
    score, per_id = cider({"1": "a b c d", "2": "E F G H."}, refs)
    assert per_id == {"1": pytest.approx(10.0), "2": pytest.approx(10.0)}
    assert score == pytest.approx(10.0)


def test_cider_identical_two_words_is_five():
    # Orders 1 and 2 have cosine 1; a 2-word text has no 3- or 4-grams (zero vectors score 0) -> 10 × 2/4 = 5.
    score, per_id = cider({"1": "a b"}, {"1": ["a b"], "2": ["c d"]})
    assert score == pytest.approx(5.0)


def test_cider_ngrams_in_every_document_weigh_nothing():
    # df = 2 = #images: weight log 2 − log 2 = 0 for every n-gram.
    score, _ = cider({"1": "x y"}, {"1": ["x y"], "2": ["x y"]})
    assert score == 0.0
    score, _ = cider({"1": "p q r s"}, {"1": ["a b c d"], "2": ["e f g h"]})
    assert score == 0.0


def test_cider_partial_overlap_with_length_penalty():
    # Candidate "a b c d e" vs ref "a b c d" (corpus of 2 images: "a b c d", "e f g h"). Every n-gram weight is
    # log 2 (df 1, or df 0 -> log max(1, 0) = 0 for the unseen "d e"...), so cosines are plain set counts:
    # 1-grams 4/(√5·√4), 2-grams 3/(√4·√3), 3-grams 2/(√3·√2), 4-grams 1/(√2·√1); length = #bigrams: 4 vs 3.
    cos = [4 / (math.sqrt(5) * 2), 3 / (2 * math.sqrt(3)), 2 / (math.sqrt(3) * math.sqrt(2)), 1 / math.sqrt(2)]
    expected = 10 * sum(cos) / 4 * math.exp(-(1**2) / (2 * 6**2))
    score, _ = cider({"1": "a b c d e"}, {"1": ["a b c d"], "2": ["e f g h"]})
    assert score == pytest.approx(expected)


def test_cider_averages_over_references_and_checks_ids():
    refs = {"1": ["a b c d", "w x y z"], "2": ["e f g h"]}
    score, _ = cider({"1": "a b c d"}, refs)
    assert score == pytest.approx(5.0)  # 10 against the first ref, 0 against the second
    with pytest.raises(ValueError, match="'3'"):
        cider({"3": "a"}, refs)
    assert cider({}, refs) == (0.0, {})


# --------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_contains_mean_and_is_deterministic():
    values = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1] * 3
    mean, lo, hi = bootstrap_ci(values, n_boot=500, seed=3)
    assert mean == pytest.approx(0.7)
    assert lo <= mean <= hi and lo < hi
    assert 0.4 < lo < 0.7 < hi < 0.95
    assert bootstrap_ci(values, n_boot=500, seed=3) == (mean, lo, hi)
    assert bootstrap_ci(values, n_boot=500, seed=4) != (mean, lo, hi)
    assert bootstrap_ci([0.5] * 7) == (0.5, 0.5, 0.5)
    assert bootstrap_ci([0.25]) == (0.25, 0.25, 0.25)
    with pytest.raises(ValueError):
        bootstrap_ci([])


# ---------------------------------------------------------------------------------------------------- registry


def test_registry():
    assert set(METRICS) == {"chartqa", "docvqa", "vqav2", "entitygrid", "json"}
    assert METRICS["chartqa"].primary == "relaxed_accuracy"
    assert METRICS["docvqa"].primary == "anls"
    assert METRICS["vqav2"].primary == "vqa_accuracy"
    assert list(METRICS["json"].columns) == ["exact_match", "token_f1", "anls"]
    assert "cider" in METRICS["json"].corpus_columns
    for spec in METRICS.values():
        assert list(spec.columns)[0] == spec.primary
        row = spec.score("7", ["7"])
        assert set(row) == set(spec.columns) and all(v == 1.0 for v in row.values())
    assert METRICS["chartqa"].primary_fn("45%", ["0.45"]) == 1.0


def test_stratified_bootstrap_is_the_mean_of_group_means():
    mean, lo, hi = stratified_bootstrap_ci([[1, 1], [0, 0, 0, 1]], n_boot=300, seed=1)
    assert mean == pytest.approx((1.0 + 0.25) / 2)  # not the pooled 3/6
    assert 0.5 <= lo <= mean <= hi <= 1.0  # the first group never varies: replicates lie in [0.5, 1]
    assert stratified_bootstrap_ci([[1, 1], [0, 0, 0, 1]], n_boot=300, seed=1) == (mean, lo, hi)
    with pytest.raises(ValueError):
        stratified_bootstrap_ci([[1], []])


def test_chartqa_overall_in_results_is_the_mean_of_its_splits():
    from llava.eval.evaluate import report_rows

    def rec(i, split, ok):
        return {"system": "pool", "method": "pool", "dataset": "chartqa", "id": f"{split}-{i}", "prediction": "x",
                "answers": ["x"], "scores": {"relaxed_accuracy": float(ok)}, "lm_visual_tokens": 980,
                "meta": {"split": split}}

    recs = [rec(0, "human", 1), rec(1, "human", 1)] + [rec(i, "augmented", i == 0) for i in range(4)]
    rows = report_rows(recs, [])
    overall = [r for r in rows if r["metric"] == "relaxed_accuracy" and not r["breakdown"]]
    assert len(overall) == 1 and float(overall[0]["value"]) == pytest.approx(62.5)
    splits = {r["bucket"]: float(r["value"]) for r in rows if r["breakdown"] == "split"}
    assert splits == {"human": pytest.approx(100.0), "augmented": pytest.approx(25.0)}
