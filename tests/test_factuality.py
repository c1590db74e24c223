"""AlignScore and the MedCAT concept F1 through their real packages, on tiny models built offline."""

import importlib.util

import pytest
from factuality_models import TEXTS, make_sentence_tools, make_tiny_alignscore, make_tiny_medcat_pack

from medcap.eval import factuality
from medcap.models.hub import ModelNotFoundError

needs_alignscore = pytest.mark.skipif(
    importlib.util.find_spec("alignscore") is None or importlib.util.find_spec("pytorch_lightning") is None,
    reason="AlignScore's package is not installed (pip install 'medcap[factuality]' and alignscore-speedofmagic)",
)
needs_medcat = pytest.mark.skipif(
    importlib.util.find_spec("medcat") is None, reason="MedCAT is not installed (pip install 'medcap[factuality]')"
)


@pytest.fixture(scope="module")
def tiny_alignscore(tmp_path_factory):
    """(backbone, checkpoint, nltk data folder, folder holding en_core_web_sm) of a tiny random AlignScore."""
    base = tmp_path_factory.mktemp("alignscore")
    backbone, ckpt = make_tiny_alignscore(base)
    return (backbone, ckpt, *make_sentence_tools(base))


@pytest.fixture
def sentence_tools(tiny_alignscore, monkeypatch):
    """The package loads spaCy's en_core_web_sm by name: a folder of that name in the working directory serves."""
    import nltk

    _, _, nltk_data, spacy_dir = tiny_alignscore
    monkeypatch.setattr(nltk.data, "path", [str(nltk_data), *nltk.data.path])
    monkeypatch.chdir(spacy_dir)


@pytest.mark.factuality  # importing pytorch_lightning alone takes ~15 s on 2 cores
@needs_alignscore
def test_alignscore_is_the_package_score_per_image(tiny_alignscore, sentence_tools):
    from alignscore import AlignScore

    backbone, ckpt, _, _ = tiny_alignscore
    scorer = factuality.load_alignscore(str(ckpt), str(backbone), batch_size=4, device="cpu")
    gts = {"a": [TEXTS[0]], "b": [TEXTS[1]], "blank": [TEXTS[2]], "empty": [""]}
    res = {"a": ["Pneumonia. A mass in the lung."], "b": [TEXTS[1]], "blank": ["  "], "empty": [""]}
    corpus, per_image = factuality.alignscore(gts, res, scorer=scorer)
    # the organisers' call: one reference (context) and one caption (claim) at a time, texts as written
    direct = AlignScore(
        model=str(backbone), batch_size=32, device="cpu", ckpt_path=str(ckpt), evaluation_mode="nli_sp", verbose=False
    )
    for i in ("a", "b"):
        assert per_image[i] == pytest.approx(direct.score(contexts=gts[i], claims=res[i])[0], abs=1e-6)
        assert 0.0 <= per_image[i] <= 1.0
    assert per_image["blank"] == 0.0 and per_image["empty"] == 1.0
    assert corpus == pytest.approx(sum(per_image.values()) / 4)


@pytest.mark.factuality  # importing pytorch_lightning alone takes ~15 s on 2 cores
@needs_alignscore
def test_alignscore_says_what_is_missing(tiny_alignscore, tmp_path, monkeypatch):
    import nltk

    backbone, ckpt, nltk_data, _ = tiny_alignscore
    with pytest.raises(ModelNotFoundError, match="AlignScore-base.ckpt"):
        factuality.load_alignscore(str(tmp_path / "none.ckpt"), str(backbone))
    with pytest.raises(ModelNotFoundError, match="AlignScore backbone"):
        factuality.load_alignscore(str(ckpt), str(tmp_path / "no-roberta"))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(ModelNotFoundError, match="punkt_tab"):
        factuality.load_alignscore(str(ckpt), str(backbone))
    monkeypatch.setattr(nltk.data, "path", [str(nltk_data)])
    monkeypatch.chdir(tmp_path)  # no en_core_web_sm here (nor installed)
    if importlib.util.find_spec("en_core_web_sm") is None:
        with pytest.raises(ModelNotFoundError, match="en_core_web_sm"):
            factuality.load_alignscore(str(ckpt), str(backbone), device="cpu")


@pytest.fixture(scope="module")
def tiny_medcat(tmp_path_factory):
    return factuality.load_medcat(str(make_tiny_medcat_pack(tmp_path_factory.mktemp("medcat"))))


@pytest.mark.factuality
@needs_medcat
def test_medcat_concept_f1_by_hand(tiny_medcat):
    gts = {
        "partial": ["The patient has pneumonia and asthma in the lungs."],  # pneumonia, asthma, lung
        "same": ["Chest X-ray with pleural effusion."],
        "filtered": ["An old infarct."],  # T999 is not a MEDCON type: no concept
        "empty": [""],
    }
    res = {
        "partial": ["Pneumonia of the brain."],  # pneumonia, brain: P 1/2, R 1/3
        "same": ["Pleural effusion on a chest X-ray"],
        "filtered": ["An old infarct."],
        "empty": [""],
    }
    corpus, per_image = factuality.medcat_score(gts, res, cat=tiny_medcat)
    assert per_image["partial"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert per_image["same"] == pytest.approx(1.0)
    assert per_image["filtered"] == 0.0  # no concept on either side scores 0, as in the organisers' scorer
    assert per_image["empty"] == 1.0
    assert corpus == pytest.approx(sum(per_image.values()) / 4)


@pytest.mark.factuality
@needs_medcat
def test_medcat_says_what_is_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match="UMLS"):
        factuality.load_medcat(str(tmp_path / "no-pack.zip"))


def test_concept_f1():
    assert factuality.concept_f1(["C1", "C2"], ["C2", "C3", "C4"]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (5 / 6))
    assert factuality.concept_f1([], ["C1"]) == 0.0 and factuality.concept_f1(["C1"], []) == 0.0
    assert len(factuality.MEDCON_TYPE_IDS) == 127 == len(set(factuality.MEDCON_TYPE_IDS))
