"""Answer normalisation and the VQA metrics against hand-computed cases."""

import pytest

from medcap.vqa.features import restrict
from medcap.vqa.metrics import paired_test, scores_one, summarise
from medcap.vqa.normalize import normalize, options, yes_no_question


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Left Lung.", "left lung"),
        ("Two", "2"),
        ("an  MRI, T2-weighted", "mri t2 weighted"),
        ("  Yes! ", "yes"),
        ("none", "0"),
        (3, "3"),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_scores_of_one_answer_by_hand():
    s = scores_one("the right lung", "Right lower lobe of the lung")  # ref tokens: right lower lobe of lung
    assert s["recall"] == pytest.approx(2 / 5)
    assert s["exact"] == 0.0
    # precision 2/2, recall 2/5 -> F1 = 2*1*0.4/1.4
    assert s["f1"] == pytest.approx(0.8 / 1.4)
    # BLEU-1: precision 1, brevity penalty exp(1 - 5/2)
    import math

    assert s["bleu1"] == pytest.approx(math.exp(1 - 5 / 2))
    assert scores_one("Two", "2")["exact"] == 1.0
    assert scores_one("", "lung") == {"exact": 0.0, "recall": 0.0, "f1": 0.0, "bleu1": 0.0}


def test_options_and_closed_restriction():
    assert options("Is this a CT or an MRI?") == ["ct", "mri"]
    assert options("Is the lesion on the left or right?") == ["left", "right"]
    assert options("Is there a mass?") == [] and yes_no_question("Is there a mass?")
    assert not yes_no_question("What organ is shown?")
    dist = {"no": 0.5, "heterogeneous": 0.2, "homogeneous": 0.3}
    assert restrict(dist, "Is it homogeneous or heterogeneous?", "CLOSED") == {"heterogeneous": 0.2, "homogeneous": 0.3}
    assert restrict(dist, "Is there a mass?", "CLOSED") == {"no": 0.5}  # yes/no only
    assert "no" not in restrict(dist, "What is it?", "OPEN")


def test_summary_splits_closed_and_open_and_resamples_images():
    rows = [
        {"qid": "1", "image_id": "a", "answer_type": "CLOSED", "content_type": "PRES", "answer": "yes", "reference": "Yes"},
        {"qid": "2", "image_id": "a", "answer_type": "CLOSED", "content_type": "PRES", "answer": "no", "reference": "Yes"},
        {"qid": "3", "image_id": "b", "answer_type": "OPEN", "content_type": "ORGAN", "answer": "lung", "reference": "the lung"},
        {"qid": "4", "image_id": "c", "answer_type": "OPEN", "content_type": "ORGAN", "answer": "liver", "reference": "left kidney"},
    ]  # fmt: skip
    s = summarise(rows, n_boot=200, seed=0)
    assert s["means"]["closed_accuracy"] == 0.5 and s["means"]["open_recall"] == 0.5
    assert s["means"]["open_exact"] == 0.5 and s["n_closed"] == 2 and s["n_open"] == 2 and s["n_images"] == 3
    lo, hi = s["intervals"]["open_recall"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert s["by_type"]["ORGAN"]["n_open"] == 2 and "closed_accuracy" not in s["by_type"]["ORGAN"]


def test_paired_test_by_image():
    a = [1.0] * 40
    b = [0.0] * 20 + [1.0] * 20
    groups = [f"img{i // 2}" for i in range(40)]
    assert paired_test(a, b, groups, n_boot=500) < 0.01
    assert paired_test(b, a, groups, n_boot=500) > 0.99
