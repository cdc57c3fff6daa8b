"""The VQA normaliser and scorers on hand-made cases, including the protocol's known pitfalls."""

from __future__ import annotations

import pytest

from healthgpt.evaluation.answer_metrics import (
    VQAItem,
    choice_correct,
    closed_correct,
    normalize_for_scoring,
    open_recall,
    parse_choice,
    reference_choice,
    score_item,
    summarize_vqa,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),
        ("The LEFT lung!", "left lung"),
        ("two", "2"),
        ("There are Three nodules", "there are 3 nodules"),
        ("1,000 mL", "1000 ml"),
        ("2.5 cm.", "2.5 cm"),
        ("an x-ray", "x ray"),
        ("isnt", "isn't"),
        ("It isn\u2019t", "it isn't"),
        ("'quoted' answer", "quoted answer"),
        ("none", "0"),
        ("T2-weighted (MRI)", "t2 weighted mri"),
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_for_scoring(raw: str | None, expected: str) -> None:
    assert normalize_for_scoring(raw) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("Yes", "yes", True),
        ("yes, there is a mass", "Yes", True),
        ("No.", "no", True),
        # yes/no inside other words never counts
        ("normal", "no", False),
        ("The node is enlarged", "no", False),
        ("It is not enlarged", "no", False),
        ("the eyes are open", "yes", False),
        ("nodes", "no", False),
        # the first yes/no word decides
        ("No, yes", "yes", False),
        ("Yes, not no", "yes", True),
        # the wrong answer and an empty prediction both count as wrong
        ("yes", "no", False),
        ("", "yes", False),
        (None, "no", False),
        # other closed answers: whole-word containment after normalisation
        ("Left", "left", True),
        ("the left side", "left", True),
        ("leftward", "left", False),
        ("T2 weighted", "t2", True),
        ("two", "2", True),
    ],
)
def test_closed_correct(prediction: str | None, reference: str, correct: bool) -> None:
    assert closed_correct(prediction, reference) is correct


def test_open_recall() -> None:
    assert open_recall("right lower lobe", "right lower lobe") == 1.0
    assert open_recall("the right lobe", "Right lower lobe") == pytest.approx(2 / 3)
    assert open_recall("three", "3") == 1.0
    assert open_recall("", "pneumonia") == 0.0
    assert open_recall(None, "pneumonia") == 0.0
    # multiplicity: a word repeated in the reference must be repeated in the prediction
    assert open_recall("left", "left left") == 0.5
    # punctuation and articles do not matter, word order does not either
    assert open_recall("Lobe, lower; right.", "the right lower lobe") == 1.0
    # whole words only
    assert open_recall("pneumothoraces", "pneumothorax") == 0.0


OPTIONS = ["Pneumonia", "Viral pneumonia", "Normal", "Tumor"]


@pytest.mark.parametrize(
    ("prediction", "index"),
    [
        ("B", 1),
        ("b", 1),
        ("(C)", 2),
        ("b)", 1),
        ("D. Tumor", 3),
        ("The answer is C", 2),
        ("Answer: D", 3),
        ("Option B", 1),
        ("viral pneumonia", 1),  # the longer option text wins over the one it contains
        ("Pneumonia", 0),
        ("tumor.", 3),
        ("A large mass", None),  # an article, not the letter A
        ("It is pneumonia or a tumor", None),  # two options: ambiguous
        ("The answer is a tumor", 3),
        ("E", None),  # no such option
        ("", None),
        (None, None),
    ],
)
def test_parse_choice(prediction: str | None, index: int | None) -> None:
    assert parse_choice(prediction, OPTIONS) == index


def test_reference_choice_and_correct() -> None:
    assert reference_choice("Normal", OPTIONS) == 2
    assert reference_choice("C. Normal", OPTIONS) == 2
    assert reference_choice("C", OPTIONS) == 2
    assert choice_correct("C", "Normal", OPTIONS)
    assert choice_correct("normal", "C. Normal", OPTIONS)
    assert not choice_correct("A", "Normal", OPTIONS)
    with pytest.raises(ValueError, match="none of the options"):
        choice_correct("A", "Cyst", OPTIONS)


def test_score_item_errors() -> None:
    with pytest.raises(ValueError, match="answer_type"):
        score_item("yes", "yes", "boolean")
    with pytest.raises(ValueError, match="options"):
        score_item("A", "A", "choice", None)


def test_summarize_columns_and_all_definition() -> None:
    items = [
        VQAItem("k1", "vqa_rad", "closed", "yes", "yes"),
        VQAItem("k2", "vqa_rad", "closed", "normal", "no"),  # wrong: "no" only inside "normal"
        VQAItem("k3", "vqa_rad", "closed", "", "no"),  # empty: wrong, still counted
        VQAItem("k4", "vqa_rad", "open", "right lobe", "right lower lobe"),  # 2/3
        VQAItem("c1", "omnimedvqa", "choice", "B", "Viral pneumonia", OPTIONS, "CT"),
        VQAItem("c2", "omnimedvqa", "choice", "A", "Viral pneumonia", OPTIONS, "CT"),
        VQAItem("c3", "omnimedvqa", "choice", "tumor", "D. Tumor", OPTIONS, "MRI"),
    ]
    summary = summarize_vqa(items)
    rad = summary["vqa_rad"]
    assert (rad["n_closed"], rad["n_open"], rad["n_choice"]) == (3, 1, 0)
    assert rad["close"] == pytest.approx(100 / 3)
    assert rad["open"] == pytest.approx(200 / 3)
    # all = question-weighted mean of closed accuracy and open recall, not the mean of the columns
    assert rad["all"] == pytest.approx(100 * (1 + 0 + 0 + 2 / 3) / 4)
    assert rad["all"] != pytest.approx((rad["close"] + rad["open"]) / 2)
    assert rad["choice"] is None
    omni = summary["omnimedvqa"]
    assert omni["choice"] == pytest.approx(200 / 3)
    assert omni["close"] is None and omni["all"] is None
    assert omni["by_modality"] == {"CT": {"n": 2, "choice": 50.0}, "MRI": {"n": 1, "choice": 100.0}}
