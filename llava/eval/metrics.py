"""Answer-scoring metrics of the evaluation suite: pure Python (numpy only for the bootstrap), no torch.

Every per-item metric returns a float in [0, 1]; tables multiply by 100. The definitions, and every place where
this code knowingly differs from a widely used reference implementation, are stated in each docstring.

Per item:
- `relaxed_accuracy` — ChartQA (Methani et al. 2020; the Pix2Struct / lmms-eval variant).
- `anls` — DocVQA (Biten et al. 2019), τ = 0.5.
- `vqa_accuracy` — VQAv2 official accuracy with the official answer normalisation.
- `exact_match`, `token_f1` — SQuAD-style, used for EntityGrid-QA and plain JSON lists.

Per corpus:
- `cider` — CIDEr-D as defined by the coco-caption code (a secondary column for free-form answers).
- `bootstrap_ci` — percentile bootstrap confidence interval of a mean over items.

`METRICS` maps a data-set name to its primary metric and its metric columns (see `MetricSpec`).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "relaxed_accuracy",
    "anls",
    "levenshtein",
    "vqa_normalize",
    "vqa_accuracy",
    "squad_normalize",
    "exact_match",
    "token_f1",
    "cider",
    "bootstrap_ci",
    "MetricSpec",
    "METRICS",
]


def _as_list(answers: str | Iterable[str]) -> list[str]:
    if isinstance(answers, str):
        return [answers]
    return [str(a) for a in answers]


# ----------------------------------------------------------------------------------------------------------------
# ChartQA: relaxed accuracy

# A plain decimal number, optionally signed, optionally in exponent form. Deliberately narrower than `float()`:
# "inf", "nan" and "1_000" are not numbers here (they would be under Python's float()). Thousands separators
# ("1,000") are not numbers either, as in the reference, so such answers are compared as strings.
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _chart_clean(text: str) -> str:
    """Strip surrounding whitespace and ONE trailing period ("12." -> "12", "Yes." -> "Yes")."""
    text = str(text).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _chart_number(text: str) -> float | None:
    """The value of `text` as a number, a trailing '%' meaning /100 ("45%" -> 0.45); None if not a number."""
    percent = text.endswith("%")
    body = text[:-1].rstrip() if percent else text
    if not _NUMBER.fullmatch(body):
        return None
    value = float(body)
    return value / 100.0 if percent else value


def relaxed_accuracy(pred: str, target: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy of one prediction: 1.0 or 0.0 (max over targets if a list is given).

    Both strings are first stripped of surrounding whitespace and of one trailing period. If both then parse as
    numbers (a trailing '%' is stripped and the number divided by 100), the prediction is correct iff
    |pred − target| / |target| ≤ `tolerance` (5%); a target of exactly 0 needs pred == 0. Otherwise the answer is
    correct iff the lower-cased strings are equal.

    Consequences worth knowing (all as in the reference definition): units are not stripped ("12 kg" vs "12" is
    wrong), a percentage is a fraction ("45%" matches "0.45" but not "45"), "1,000" is a string, not a number.
    Differences from lmms-eval's `relaxed_correctness`: it compares a zero target as strings ("0.0" ≠ "0"), we
    compare it numerically; it does not strip whitespace or a trailing period; non-finite "inf"/"nan" are
    numbers there and strings here.
    """
    pred_c = _chart_clean(pred)
    for tgt in _as_list(target):
        tgt_c = _chart_clean(tgt)
        p, t = _chart_number(pred_c), _chart_number(tgt_c)
        if p is not None and t is not None:
            ok = p == t if t == 0 else abs(p - t) / abs(t) <= tolerance
        else:
            ok = pred_c.lower() == tgt_c.lower()
        if ok:
            return 1.0
    return 0.0


# ----------------------------------------------------------------------------------------------------------------
# DocVQA: ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1) by the two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_clean(text: str) -> str:
    return " ".join(str(text).lower().split())


def anls(pred: str, answers: str | Sequence[str], tau: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (DocVQA; Biten et al. 2019).

    Strings are lower-cased, stripped, and internal runs of whitespace collapsed to one space. For each answer,
    NL = Levenshtein(pred, answer) / max(len(pred), len(answer)) (0 when both are empty) and s = 1 − NL if
    NL < τ, else 0 — so NL exactly at τ scores 0, as in the paper's definition. Returns the max of s over answers
    (0.0 when there are none).

    Differences from lmms-eval's `anls`: it keeps s = 0.5 at NL == τ exactly (it zeroes only s < τ), and it takes
    the length denominator from the unnormalised strings; here both use the normalised strings.
    """
    p = _anls_clean(pred)
    best = 0.0
    for ans in _as_list(answers):
        a = _anls_clean(ans)
        length = max(len(p), len(a))
        nl = levenshtein(p, a) / length if length else 0.0
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


# ----------------------------------------------------------------------------------------------------------------
# VQAv2: official normalisation and accuracy

# Contractions written without apostrophes -> canonical form, as in the official VQA evaluation. The official
# table also has a few capitalised keys ("Im", "Ive", "Id've", "I'dve"); they can never match because the text is
# lower-cased first, so they are left out (no behaviour change). Keys are whitespace-separated `key>value` pairs.
_CONTRACTION_PAIRS = """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've couldnt've>couldn't've
didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't hadnt've>hadn't've hadn'tve>hadn't've hasnt>hasn't
havent>haven't hed>he'd hed've>he'd've he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's isnt>isn't
itd>it'd itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am mightnt>mightn't mightnt've>mightn't've
mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock
oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've
she'dve>she'd've she's>she's shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've
shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've
somebodyll>somebody'll somebodys>somebody's someoned>someone'd someoned've>someone'd've someone'dve>someone'd've
someonell>someone'll someones>someone's somethingd>something'd somethingd've>something'd've
something'dve>something'd've somethingll>something'll thats>that's thered>there'd thered've>there'd've
there'dve>there'd've therere>there're theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've
theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've weve>we've
werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've whens>when's whered>where'd
wheres>where's whereve>where've whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's whove>who've
whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've
wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've y'alld've>y'all'd've
y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've youll>you'll youre>you're youve>you've
"""
VQA_CONTRACTIONS: dict[str, str] = dict(pair.split(">") for pair in _CONTRACTION_PAIRS.split())

# Number words -> digits (the official "manualMap"; "none" counts as 0).
VQA_NUMBER_WORDS: dict[str, str] = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
VQA_NUMBER_WORDS["none"] = "0"
VQA_ARTICLES = frozenset({"a", "an", "the"})
# Punctuation characters handled by the official code. Apostrophes, colons and periods are not in the list
# (periods have their own rule below).
VQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# A comma between two digits ("1,000"): its presence anywhere switches the whole string to "delete punctuation".
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# A period NOT followed by a digit. The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a typo for a
# look-behind and is in effect a no-op, so only "not followed by a digit" decides: "1.5" and ".5" keep their
# period, "5." and "u.s.a" lose theirs. (The official call also passes re.UNICODE as `count`, capping the removals
# at 32 per answer; irrelevant for answers this short, and not reproduced.)
_LONE_PERIOD = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    """Official `processPunctuation`: per punctuation character, delete it if it touches a space in the input (or
    if the input holds a digit-comma-digit anywhere), else replace it by a space; then drop lone periods."""
    out = text
    delete_all = _DIGIT_COMMA.search(text) is not None
    for p in VQA_PUNCTUATION:
        if delete_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _LONE_PERIOD.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    """Official `processDigitArticle`: lower-case, split on whitespace, number words -> digits, drop articles,
    expand contractions, join with single spaces."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words if w not in VQA_ARTICLES)


def vqa_normalize(text: str) -> str:
    """The official VQA answer normalisation: newline/tab -> space, strip, punctuation rule, then lower-case,
    number words -> digits, articles dropped, contractions ("dont" -> "don't") expanded.

    Examples: "Two dogs." -> "2 dogs"; "1,000" -> "1000"; "1.5" -> "1.5"; "The Cat" -> "cat"; "yes!" -> "yes".
    """
    text = str(text).replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_accuracy(pred: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against its (normally 10) human answers.

    The prediction and every human answer go through `vqa_normalize`. For each of the n leave-one-out subsets of
    n−1 human answers, acc = min(1, #answers in the subset equal to the prediction / 3); the result is the mean
    over the n subsets. With 10 answers of which k match: k = 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, ≥4 -> 1.0.

    Decisions: (1) human answers are normalised always — the official script normalises them (and the
    prediction) only when the 10 answers disagree; released VQAv2 answers are already in normal form, so this
    changes nothing on real data and makes the metric symmetric. lmms-eval's extra pre-tokenisation of the
    prediction (splitting "'s" off as " 's") is not applied: it makes "man's" unmatchable. (2) With a single
    human answer (no leave-one-out possible) the score is exact match of the normalised strings; with none it is
    0.0. The metric is designed for 10 answers: with 2–3 answers the maximum is below 1.
    """
    answers = [vqa_normalize(a) for a in _as_list(human_answers)]
    if not answers:
        return 0.0
    p = vqa_normalize(pred)
    if len(answers) == 1:
        return float(answers[0] == p)
    matches = sum(a == p for a in answers)
    total = 0.0
    for a in answers:
        others = matches - (a == p)
        total += min(1.0, others / 3.0)
    return total / len(answers)


# ----------------------------------------------------------------------------------------------------------------
# SQuAD-style exact match and token F1 (EntityGrid-QA, plain JSON)

_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lower-case, delete ASCII punctuation, drop the words a/an/the, collapse
    whitespace. ("The Red circle." -> "red circle")."""
    text = str(text).lower().translate(_PUNCT_TABLE)
    return " ".join(_SQUAD_ARTICLES.sub(" ", text).split())


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if the SQuAD-normalised prediction equals any SQuAD-normalised answer, else 0.0."""
    p = squad_normalize(pred)
    return float(any(p == squad_normalize(a) for a in _as_list(answers)))


def token_f1(pred: str, answers: str | Sequence[str]) -> float:
    """SQuAD token F1 (bag-of-words overlap of normalised tokens), max over answers.

    If the prediction or an answer has no tokens after normalisation, that pair scores 1.0 iff both are empty.
    """
    p_tokens = squad_normalize(pred).split()
    best = 0.0
    for ans in _as_list(answers):
        a_tokens = squad_normalize(ans).split()
        if not p_tokens or not a_tokens:
            score = float(p_tokens == a_tokens)
        else:
            common = sum((Counter(p_tokens) & Counter(a_tokens)).values())
            if common == 0:
                score = 0.0
            else:
                precision, recall = common / len(p_tokens), common / len(a_tokens)
                score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


# ----------------------------------------------------------------------------------------------------------------
# CIDEr-D (corpus level)

_CIDER_PUNCT = re.compile(r"[^\w\s']|_")


def _cider_tokens(text: str) -> list[str]:
    """Lower-case, punctuation (except apostrophes) -> space, split. A stand-in for coco-caption's Java PTB
    tokenizer, which also lower-cases and drops punctuation; tokenisation of odd inputs (clitics, hyphens) may
    differ slightly from it."""
    return _CIDER_PUNCT.sub(" ", str(text).lower()).split()


def _ngram_counts(tokens: list[str], n: int) -> Counter:
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[tuple(tokens[i : i + k])] += 1
    return counts


def cider(
    preds: Mapping[str, str], refs: Mapping[str, Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, dict[str, float]]:
    """CIDEr-D of candidate texts against reference texts; returns (corpus score, per-id scores).

    Follows the coco-caption definition (Vedantam et al. 2015, "CIDEr-D" variant):
    - n-grams of order 1..`n` of each tokenised text; document frequency df(g) = number of ids whose reference
      set contains g; the log corpus size is log(#ids in `refs`);
    - a text's vector for order k holds tf(g) · (log #ids − log max(1, df(g))) for its k-grams;
    - for each reference, per order k: Σ_g min(v_cand(g), v_ref(g)) · v_ref(g) / (‖v_cand‖ ‖v_ref‖) (0 when a norm
      is 0), times the length penalty exp(−(ℓ_cand − ℓ_ref)² / (2σ²)), where ℓ counts the text's BIGRAMS (the
      coco-caption code counts the order-2 entries, a known quirk kept for comparability);
    - an id's score = 10 × mean over orders of the mean over its references; the corpus score = mean over ids.
    Ids in `preds` must all be in `refs`; document frequencies use every id of `refs`.
    """
    missing = [k for k in preds if k not in refs]
    if missing:
        raise ValueError(f"cider: no references for id {missing[0]!r}")
    if not preds:
        return 0.0, {}
    ref_counts = {k: [_ngram_counts(_cider_tokens(r), n) for r in _as_list(v)] for k, v in refs.items()}
    df: Counter = Counter()
    for counts in ref_counts.values():
        df.update(set().union(*[c.keys() for c in counts]) if counts else set())
    log_n = math.log(float(len(refs)))

    def vectorise(counts: Counter):
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = tf * (log_n - math.log(max(1.0, df[gram])))
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:
                bigrams += tf
        return vec, [math.sqrt(x) for x in norm], bigrams

    per_id: dict[str, float] = {}
    for key, text in preds.items():
        vc, nc, lc = vectorise(_ngram_counts(_cider_tokens(text), n))
        score = np.zeros(n)
        for rcounts in ref_counts[key]:
            vr, nr, lr = vectorise(rcounts)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                if nc[k] != 0 and nr[k] != 0:
                    val /= nc[k] * nr[k]
                score[k] += val * penalty
        n_refs = max(1, len(ref_counts[key]))
        per_id[key] = float(score.mean() / n_refs * 10.0)
    return float(np.mean(list(per_id.values()))), per_id


# ----------------------------------------------------------------------------------------------------------------
# Bootstrap


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and a percentile-bootstrap (1 − alpha) interval over items.

    Resamples the items with replacement `n_boot` times (numpy's PCG64 seeded with `seed`, so the result is
    deterministic) and takes the alpha/2 and 1 − alpha/2 quantiles of the resampled means, widened if needed so
    that lo ≤ mean ≤ hi. Raises ValueError on an empty list.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError("bootstrap_ci: need n_boot >= 1 and 0 < alpha < 1")
    mean = float(x.mean())
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return mean, min(float(lo), mean), max(float(hi), mean)


def stratified_bootstrap_ci(
    groups: Sequence[Sequence[float]], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(macro mean, lo, hi) for a score reported as the mean of per-group means (ChartQA's two splits): each
    bootstrap replicate resamples every group within itself, so the groups keep their sizes and weights."""
    arrays = [np.asarray(list(g), dtype=np.float64) for g in groups]
    if not arrays or any(a.size == 0 for a in arrays):
        raise ValueError("stratified_bootstrap_ci: every group needs values")
    if n_boot < 1 or not 0.0 < alpha < 1.0:
        raise ValueError("stratified_bootstrap_ci: need n_boot >= 1 and 0 < alpha < 1")
    mean = float(np.mean([a.mean() for a in arrays]))
    rng = np.random.default_rng(seed)
    reps = np.mean([a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(axis=1) for a in arrays], axis=0)
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return mean, min(float(lo), mean), max(float(hi), mean)


# ----------------------------------------------------------------------------------------------------------------
# Registry

ItemMetric = Callable[[str, Sequence[str]], float]
CorpusMetric = Callable[[Mapping[str, str], Mapping[str, Sequence[str]]], tuple[float, dict[str, float]]]


@dataclass(frozen=True)
class MetricSpec:
    """How one data set is scored.

    `columns` maps column name -> per-item function `fn(pred, answers) -> float in [0, 1]` (all of them take the
    item's answer list); the first column is the primary one (`primary`). `corpus_columns` are corpus-level
    metrics `fn(preds_by_id, answers_by_id) -> (score, per_id)` reported beside them. Tables show 100 × mean.
    `macro_over` names an item-meta key whose groups are scored separately and averaged for the overall value
    (ChartQA: the human and augmented test splits, as the benchmark reports them), not pooled item by item.
    """

    primary: str
    columns: dict[str, ItemMetric]
    corpus_columns: dict[str, CorpusMetric] = field(default_factory=dict)
    macro_over: Optional[str] = None

    def __post_init__(self):
        if next(iter(self.columns), None) != self.primary:
            raise ValueError("MetricSpec: the primary metric must be the first column")

    @property
    def primary_fn(self) -> ItemMetric:
        return self.columns[self.primary]

    def score(self, pred: str, answers: Sequence[str]) -> dict[str, float]:
        """Every per-item column for one prediction."""
        return {name: fn(pred, answers) for name, fn in self.columns.items()}


METRICS: dict[str, MetricSpec] = {
    "chartqa": MetricSpec("relaxed_accuracy", {"relaxed_accuracy": relaxed_accuracy}, macro_over="split"),
    "docvqa": MetricSpec("anls", {"anls": anls}),
    "vqav2": MetricSpec("vqa_accuracy", {"vqa_accuracy": vqa_accuracy}),
    "entitygrid": MetricSpec("exact_match", {"exact_match": exact_match, "token_f1": token_f1}),
    "json": MetricSpec(
        "exact_match",
        {"exact_match": exact_match, "token_f1": token_f1, "anls": anls},
        corpus_columns={"cider": cider},
    ),
}
