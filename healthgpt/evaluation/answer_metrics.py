"""Comprehension metrics: the LLaVA-Med VQA protocol, written out and made strict.

HealthGPT's Table 1 scores VQA-RAD, SLAKE and PathVQA the way LLaVA-Med does: closed questions
by accuracy, open questions by token recall, after a VQA-style answer normalisation. This module
implements that protocol from its definition (not from the LLaVA-Med script) and fixes the
script's known pitfalls, each of which is covered by a test:

* yes/no is matched as a whole word, never inside another word ("no" is not found in "normal",
  "node" or "not"; "yes" not in "eyes");
* a closed prediction that says neither yes nor no counts as wrong (the LLaVA-Med script drops
  some wrong closed answers from the denominator, which inflates accuracy);
* an empty prediction scores 0, never raises;
* number words and digits are the same answer ("two" == "2").

Columns (the paper's Table 1, Table 9):

``close``
    accuracy (%) over closed questions. For a yes/no reference the first "yes"/"no" word of the
    prediction is its answer. For another closed reference (e.g. "left", "t2") the prediction is
    right when its normalised words contain the reference's normalised words as a contiguous run.
``open``
    mean token recall (%) over open questions: the fraction of the reference's normalised words
    (counted with multiplicity) that the prediction contains.
``all``
    the mean over *every* question of its per-question score, where a closed question scores 1 or
    0 and an open question its recall; i.e. ``(n_closed * close + n_open * open) / (n_closed +
    n_open)``. It is a question-weighted mean, not the mean of the two columns.
``choice`` (``op`` in the paper)
    accuracy (%) over single-choice questions: the option the prediction picks (by its letter or
    by its text) must be the reference option. Reported overall and per imaging modality.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALL_DEFINITION",
    "VQAItem",
    "choice_correct",
    "closed_correct",
    "normalize_for_scoring",
    "open_recall",
    "parse_choice",
    "reference_choice",
    "score_item",
    "summarize_vqa",
    "tokenize_answer",
]

ALL_DEFINITION = (
    "'all' is the mean over every closed and open question of its score, where a closed question "
    "scores 1 (correct) or 0 and an open question scores its token recall; it equals "
    "(n_closed*close + n_open*open)/(n_closed + n_open), a question-weighted mean rather than the "
    "mean of the two columns. Single-choice questions are reported apart, as 'choice'."
)

_ARTICLES = frozenset({"a", "an", "the"})

# Spoken numbers and the VQA convention "none" -> "0".
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10", "eleven": "11",
    "twelve": "12", "thirteen": "13", "fourteen": "14", "fifteen": "15", "sixteen": "16",
    "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20", "thirty": "30",
    "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100",
}

# Contractions written without their apostrophe are mapped to the written form, so "isnt" and
# "isn't" are the same word. (Negations are kept: "isn't" is not turned into "no".)
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "isnt": "isn't", "itll": "it'll",
    "ive": "i've", "mightnt": "mightn't", "mustnt": "mustn't", "neednt": "needn't",
    "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't",
    "wouldnt": "wouldn't", "wouldve": "would've", "youre": "you're", "youve": "you've",
}

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "\u00b4": "'"})
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
# A period that is not a decimal point (digit.digit) is punctuation.
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
# Everything but letters, digits, whitespace, apostrophes, periods (handled above) and % is a separator.
_PUNCT = re.compile(r"[^\w\s'.%]|_")
_EDGE_APOSTROPHES = re.compile(r"(?:(?<=\s)|^)'+|'+(?:(?=\s)|$)")


def normalize_for_scoring(text: str | None) -> str:
    """Canonical form of an answer: lower case, no punctuation, digits for number words,
    no articles, contractions with their apostrophe, single spaces.

    >>> normalize_for_scoring("The Two lesions, left-sided.")
    '2 lesions left sided'
    """
    return " ".join(tokenize_answer(text))


def tokenize_answer(text: str | None) -> list[str]:
    """The words of :func:`normalize_for_scoring` as a list."""
    if not text:
        return []
    s = unicodedata.normalize("NFKC", str(text)).translate(_APOSTROPHES).lower()
    s = _THOUSANDS_COMMA.sub("", s)
    s = _NON_DECIMAL_PERIOD.sub(" ", s)
    s = _PUNCT.sub(" ", s)
    s = _EDGE_APOSTROPHES.sub(" ", s)
    words: list[str] = []
    for word in s.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return words


def _contains_run(haystack: Sequence[str], needle: Sequence[str]) -> bool:
    n = len(needle)
    if n == 0:
        return False
    return any(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


def closed_correct(prediction: str | None, reference: str) -> bool:
    """Accuracy of one closed question (see the module docstring)."""
    ref = tokenize_answer(reference)
    pred = tokenize_answer(prediction)
    if not pred or not ref:
        return False
    if ref in (["yes"], ["no"]):
        said = next((w for w in pred if w in ("yes", "no")), None)
        return said == ref[0]
    return pred == ref or _contains_run(pred, ref)


def open_recall(prediction: str | None, reference: str) -> float:
    """Token recall of one open question: matched reference words / reference words.

    Words are counted with multiplicity (a reference word that occurs twice must occur twice).
    A reference that normalises to nothing (e.g. only "the") is compared case-insensitively as text.
    """
    ref = tokenize_answer(reference)
    pred = tokenize_answer(prediction)
    if not ref:
        return float(bool(prediction) and str(prediction).strip().lower() == str(reference).strip().lower())
    if not pred:
        return 0.0
    available = Counter(pred)
    hit = 0
    for word, count in Counter(ref).items():
        hit += min(count, available.get(word, 0))
    return hit / len(ref)


# -- single choice ----------------------------------------------------------------------------
_LETTER_LEAD = re.compile(r"^\s*[\(\[]?([A-Za-z])([\)\].:,]|\s|$)")
_LETTER_PHRASE = re.compile(r"\b(?i:answer|option|choice)\s*(?i:is)?\s*[:\-]?\s*[\(\[]?([A-Z])\b(?![.'\u2019]\w)")
_REF_LETTER = re.compile(r"^\s*([A-Z])(?:[.:)]\s|[.:)]?$|\s)")


def _letter_index(letter: str, n_options: int) -> int | None:
    idx = ord(letter.upper()) - ord("A")
    return idx if 0 <= idx < n_options else None


def parse_choice(prediction: str | None, options: Sequence[str]) -> int | None:
    """Index of the option a prediction picks, or ``None`` when it picks none or several.

    Options are lettered A, B, C, ... in order. Recognised: a leading letter ("B", "(B)",
    "B. text", "b)"), "answer/option is B", or an option's text. When several option texts
    occur in the prediction, the longest one wins if it contains the others ("viral pneumonia"
    over "pneumonia"); otherwise the prediction is ambiguous (``None``).
    """
    if not prediction or not prediction.strip() or not options:
        return None
    text = prediction.strip()
    norm_pred = tokenize_answer(text)
    norm_opts = [tokenize_answer(o) for o in options]
    # An exact option text first: "A" could be both a letter and, say, a blood group option.
    for i, opt in enumerate(norm_opts):
        if opt and norm_pred == opt:
            return i
    lead = _LETTER_LEAD.match(text)
    if lead:
        letter, delim = lead.group(1), lead.group(2)
        idx = _letter_index(letter, len(options))
        rest = tokenize_answer(text[lead.end():])
        if idx is not None and (
            (delim and delim.strip() and (letter.isupper() or delim in ")]"))  # "B.", "(B)", "b)"
            or (not rest and (letter.isupper() or text.strip("()[]. :").lower() == letter.lower()))  # "B", "b"
            or (letter.isupper() and rest and _contains_run(rest, norm_opts[idx]))  # "B pneumonia"
        ):
            return idx
    phrase = _LETTER_PHRASE.search(text)
    if phrase:
        idx = _letter_index(phrase.group(1), len(options))
        if idx is not None:
            return idx
    hits = [i for i, opt in enumerate(norm_opts) if _contains_run(norm_pred, opt)]
    if not hits:
        return None
    if len(hits) == 1:
        return hits[0]
    longest = max(hits, key=lambda i: len(norm_opts[i]))
    if all(i == longest or _contains_run(norm_opts[longest], norm_opts[i]) for i in hits):
        return longest
    return None


def reference_choice(reference: str, options: Sequence[str]) -> int | None:
    """Index of the reference option: its text, or its letter ("B" / "B. text")."""
    ref = reference.strip()
    stripped = [o.strip() for o in options]
    if ref in stripped:
        return stripped.index(ref)
    norm = tokenize_answer(ref)
    for i, opt in enumerate(options):
        if norm and tokenize_answer(opt) == norm:
            return i
    m = _REF_LETTER.match(ref)
    if m:
        return _letter_index(m.group(1), len(options))
    return None


def choice_correct(prediction: str | None, reference: str, options: Sequence[str]) -> bool:
    ref = reference_choice(reference, options)
    if ref is None:
        raise ValueError(f"reference {reference!r} is none of the options {list(options)}")
    return parse_choice(prediction, options) == ref


def score_item(prediction: str | None, reference: str, answer_type: str, options: Sequence[str] | None = None) -> float:
    """Per-question score in [0, 1]: closed/choice 0 or 1, open the token recall."""
    if answer_type == "closed":
        return float(closed_correct(prediction, reference))
    if answer_type == "open":
        return open_recall(prediction, reference)
    if answer_type == "choice":
        if not options:
            raise ValueError("a choice question needs its options")
        return float(choice_correct(prediction, reference, options))
    raise ValueError(f"unknown answer_type {answer_type!r} (expected open, closed or choice)")


# -- aggregation ------------------------------------------------------------------------------
@dataclass
class VQAItem:
    """One scored comprehension prediction."""

    key: str
    benchmark: str
    answer_type: str
    prediction: str
    reference: str
    options: list[str] | None = None
    modality: str | None = None
    subtask: str = "vqa"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score(self) -> float:
        return score_item(self.prediction, self.reference, self.answer_type, self.options)


def _pct(values: list[float]) -> float | None:
    return 100.0 * sum(values) / len(values) if values else None


def summarize_vqa(items: Iterable[VQAItem]) -> dict[str, dict[str, Any]]:
    """Per benchmark: counts and the ``close``/``open``/``all``/``choice`` columns (percent).

    A column whose question type is absent from a benchmark is ``None`` (not 0).
    Choice accuracy is also broken down ``by_modality`` (the paper's Table 9).
    """
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    by_modality: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        s = item.score
        scores[item.benchmark][item.answer_type].append(s)
        if item.answer_type == "choice":
            by_modality[item.benchmark][item.modality or "unknown"].append(s)
    out: dict[str, dict[str, Any]] = {}
    for bench in sorted(scores):
        per = scores[bench]
        closed, open_, choice = per.get("closed", []), per.get("open", []), per.get("choice", [])
        out[bench] = {
            "n_closed": len(closed),
            "n_open": len(open_),
            "n_choice": len(choice),
            "close": _pct(closed),
            "open": _pct(open_),
            "all": _pct(closed + open_),
            "choice": _pct(choice),
            "by_modality": {m: {"n": len(v), "choice": _pct(v)} for m, v in sorted(by_modality[bench].items())},
        }
    return out
