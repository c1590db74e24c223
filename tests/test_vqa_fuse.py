"""Answer fusers on hand-made answer rows: the weighted vote, MBR over token F1, and learned weights."""

from pathlib import Path

from medcap.vqa.config import AnswerFuserConfig
from medcap.vqa.data import Question
from medcap.vqa.fuse import fit_weights, fuse


def q(qid, text, answer, atype):
    return Question(qid, f"img{qid}", Path("x.jpg"), text, answer, atype, raw_qid=qid)


def row(qid, scores):
    return {"id": qid, "answer": next(iter(scores)), "scores": scores}


def test_vote_mbr_and_weights():
    qs = [q("1", "Is there a mass?", "yes", "CLOSED"), q("2", "Where is the lesion?", "right lower lobe", "OPEN")]
    per = {
        "a": {"1": row("1", {"yes": 0.6, "no": 0.4}), "2": row("2", {"right lung": 1.0})},
        "b": {"1": row("1", {"no": 0.9, "yes": 0.1}), "2": row("2", {"right lower lobe": 0.45, "left": 0.55})},
    }
    vote = fuse(AnswerFuserConfig("v", "vote"), qs, per, True)
    assert [r["answer"] for r in vote] == ["no", "right lung"]  # 1.3 > 0.7; 1.0 > 0.55 > 0.45
    weighted = fuse(AnswerFuserConfig("w", "vote", weights={"a": 5.0}), qs, per, True)  # yes 3.1 > no 2.9
    assert weighted[0]["answer"] == "yes"
    mbr = fuse(AnswerFuserConfig("m", "mbr"), qs, per, True)
    assert mbr[0]["answer"] == "no"  # yes/no share no token: MBR is the vote
    split = {"a": {"2": row("2", {"left lung": 0.4, "right lung": 0.35, "right lower lung": 0.25})}}
    assert fuse(AnswerFuserConfig("v", "vote"), qs[1:], split, True)[0]["answer"] == "left lung"
    # expected F1: left lung 0.4 + 0.35*0.5 + 0.25*0.4 = 0.675 < right lung 0.35 + 0.4*0.5 + 0.25*0.8 = 0.75
    assert fuse(AnswerFuserConfig("m", "mbr"), qs[1:], split, True)[0]["answer"] == "right lung"


def test_learned_weights_pick_the_answerer_that_is_right():
    qs = [q(str(i), "Is there a mass?", "yes" if i % 2 else "no", "CLOSED") for i in range(10)]
    per = {
        "good": {x.qid: row(x.qid, {x.answer: 0.6, "no" if x.answer == "yes" else "yes": 0.4}) for x in qs},
        "bad": {x.qid: row(x.qid, {"yes": 0.9, "no": 0.1}) for x in qs},
    }
    weights, accuracy = fit_weights([0.0, 1.0, 2.0], qs, per, True)
    assert accuracy["CLOSED"] == 1.0 and weights["CLOSED"]["good"] > weights["CLOSED"]["bad"]
    fused = fuse(AnswerFuserConfig("f", "learned"), qs, per, True, weights)
    assert [r["answer"] for r in fused] == [x.answer for x in qs]


def test_learned_fuser_on_its_own_index_split_is_cross_fitted():
    from medcap.vqa.stages import _crossfit_fuse

    qs = [q(str(i), "Is there a mass?", "yes" if i % 2 else "no", "CLOSED") for i in range(20)]
    per = {
        "good": {x.qid: row(x.qid, {x.answer: 0.6, "no" if x.answer == "yes" else "yes": 0.4}) for x in qs},
        "bad": {x.qid: row(x.qid, {"yes": 0.9, "no": 0.1}) for x in qs},
    }
    rows = _crossfit_fuse(AnswerFuserConfig("f", "learned"), qs, per, qs, per, True, seed=0)
    assert [r["id"] for r in rows] == [x.qid for x in qs]
    assert [r["answer"] for r in rows] == [x.answer for x in qs]  # every fold's weights favour the good answerer
