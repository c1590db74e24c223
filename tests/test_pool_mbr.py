"""Pool MBR: the pool artifact, evidence weights, penalties, the own-case rule and the shortlist, against scores
computed by hand with bert-score's own matching (``BertScorer.block``)."""

import numpy as np
import pytest

from medcap.config import FuserConfig
from medcap.eval.imageclef import preprocess
from medcap.fuser.pool import (
    HypothesisPool,
    build_pool,
    embed_texts,
    index_hypotheses,
    mean_of,
    ntokens,
    sentence_hypotheses,
)
from medcap.fuser.pool_mbr import PoolMBR
from medcap.fuser.pool_score import PoolScorer
from medcap.records import Neighbour, NeighbourList

CAPTIONS = [
    ("Axial CT shows a large mass in the liver. There is no ascites.", "c1"),
    ("Axial CT of the liver with a hypodense mass.", "c2"),
    ("MRI of the brain shows a ring enhancing lesion.", "c3"),
    ("Brain MRI: ring enhancing lesion in the left frontal lobe. Mild edema. No shift.", "c4"),
    ("Chest radiograph with a right lower lobe consolidation.", "c5"),
]
TOL = 1e-4  # float16 token storage against bert-score's float32 (measured: < 2e-5)


@pytest.fixture(scope="module")
def scorer():
    from medcap.eval.metrics import load_bertscorer

    return load_bertscorer("minilm", batch_size=16, device="cpu")


@pytest.fixture(scope="module")
def text_model():
    from medcap.models.textenc import sentence_model

    return sentence_model()


@pytest.fixture(scope="module")
def pool(tmp_path_factory, scorer, text_model):
    out = tmp_path_factory.mktemp("pool") / "minilm"
    build_pool(out, "k", [(f"i{j}", c, g) for j, (c, g) in enumerate(CAPTIONS)], scorer, text_model)
    return HypothesisPool.load(out)


def fuser(hypotheses, scorer, text_model, groups, **settings):
    import torch

    cfg = FuserConfig(name="p", kind="pool-mbr", image_text=0, **settings)
    ps = PoolScorer(hypotheses, scorer, text_model, sentences=cfg.sentences, genericity_sample=cfg.genericity_sample,
                    dtype=torch.float32)  # fmt: skip
    return PoolMBR(cfg, ps, {}, groups)


def _neighbours(qid, order, scores):
    return NeighbourList(qid, tuple(Neighbour(f"i{j}", s, CAPTIONS[j][0]) for j, s in zip(order, scores, strict=True)))


def test_one_pass_gives_the_tokens_and_the_sentence_models_vectors(scorer, text_model, monkeypatch):
    texts = [preprocess(c) for c, _ in CAPTIONS] + ["a"]
    assert mean_of(scorer, text_model)
    pairs, vectors = embed_texts(scorer, text_model, texts)
    encoded = text_model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    assert vectors.shape == encoded.shape
    assert np.allclose(vectors, encoded, atol=1e-5)  # the sentence model's own vectors, from BERTScore's pass
    for (e, w), (e2, w2) in zip(pairs, scorer.token_embeddings(texts), strict=True):
        assert np.array_equal(w, w2) and np.allclose(e, e2, atol=1e-6)
    monkeypatch.setattr(text_model, "max_seq_length", 8)  # past it the sentence model truncates: it encodes those
    _, short = embed_texts(scorer, text_model, texts)
    assert np.allclose(short, text_model.encode(texts, normalize_embeddings=True), atol=1e-5)
    assert not np.allclose(short[0], vectors[0], atol=1e-3)
    assert not mean_of(scorer, object())  # any other encoder: two passes


def test_sentences_and_hypotheses():
    assert sentence_hypotheses("One. Two") == ["One.", "Two"]
    assert sentence_hypotheses("A b c. D e f! G h i?") == ["A b c.", "D e f!", "G h i?", "A b c. D e f!"]
    assert sentence_hypotheses("Only one sentence.") == []
    raw, text, groups, n = index_hypotheses(CAPTIONS + [("axial ct of the liver with a hypodense mass", "c9")])
    assert text[:5] == [preprocess(c) for c, _ in CAPTIONS] and n == 5  # captions first, deduplicated
    assert groups[1] == {"c2", "c9"}
    assert "there is no ascites" in text and "mild edema" not in text  # fewer than 3 words: not a hypothesis
    assert ntokens("") == 1 and ntokens("a b c") == 3


def test_the_pool_holds_bertscores_tokens_and_is_built_resumably(tmp_path, pool, scorer, text_model, monkeypatch):
    texts = pool.text
    emb, w = pool.padded([0, 5])
    ref = scorer.token_embeddings([texts[0], texts[5]])
    assert np.abs(emb[0, : len(ref[0][1])] - ref[0][0]).max() < 1e-3 and (w[0, : len(ref[0][1])] == ref[0][1]).all()
    assert w[0, 0] == 0 and w[0, len(ref[0][1]) - 1] == 0  # [CLS] and [SEP] weigh nothing
    assert pool.image_row == {f"i{j}": j for j in range(5)}

    import medcap.fuser.pool as pool_module

    monkeypatch.setattr(pool_module, "SHARD", 4)
    calls = []
    real = scorer.token_and_mean_embeddings  # one pass gives tokens and vectors (MiniLM is both models)

    def dies_after_one_shard(sentences):
        calls.append(len(sentences))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(sentences)

    monkeypatch.setattr(scorer, "token_and_mean_embeddings", dies_after_one_shard)
    out = tmp_path / "pool"
    rows = [(f"i{j}", c, g) for j, (c, g) in enumerate(CAPTIONS)]
    with pytest.raises(RuntimeError, match="killed"):
        build_pool(out, "k", rows, scorer, text_model)
    build_pool(out, "k", rows, scorer, text_model)  # resumes: the first shard is not embedded again
    assert len(texts) == 9 and calls == [4, 4, 4, 1]
    again = HypothesisPool.load(out)
    assert again.text == texts and np.allclose(
        np.asarray(again.tokens), np.asarray(pool.tokens), atol=2e-3
    )  # other batches


def test_neighbour_mbr_is_classic_mbr(pool, scorer, text_model):
    fuse = fuser(pool, scorer, text_model, {"q": "cq"}, pool="neighbours", tau=None, genericity=0, length_penalty=0,
                 evidence_k=4)  # fmt: skip
    out = fuse([("q", {}, _neighbours("q", [0, 1, 2, 3], [0.9, 0.8, 0.7, 0.6]))])[0]
    texts = [preprocess(CAPTIONS[j][0]) for j in range(4)]
    bs = scorer.block(texts, texts)
    expected = [(bs[i].sum() - bs[i, i]) / 3 for i in range(4)]  # mean BERTScore to the other three
    assert out.caption == CAPTIONS[int(np.argmax(expected))][0]
    assert out.extra["score"] == pytest.approx(max(expected), abs=TOL)


def exact_scores(pool, scorer, order, sims, tau, genericity, length_penalty, own):
    """Every hypothesis's score by hand: BERTScore to the evidence, G over every index caption, length, own case."""
    distinct = [preprocess(c) for c, _ in CAPTIONS]
    bs = scorer.block(pool.text, distinct)
    w = np.exp((np.array(sims) - sims[0]) / tau)
    w /= w.sum()
    med = np.median([np.log(ntokens(distinct[j])) for j in order])
    score = (
        bs[:, order] @ w
        - genericity * bs.mean(1)
        - length_penalty * np.abs(np.log([ntokens(t) for t in pool.text]) - med)
    )
    score[[h for h, g in enumerate(pool.groups) if g == {own}]] = -np.inf  # the query's own case wrote these
    return score


@pytest.mark.parametrize("shortlist", [None, 1000])
def test_index_pool_scores_every_caption_and_sentence(pool, scorer, text_model, shortlist):
    fuse = fuser(pool, scorer, text_model, {"q": "c3"}, tau=0.05, genericity=0.1, length_penalty=0.01, evidence_k=3,
                 shortlist=shortlist, genericity_sample=None)  # fmt: skip
    out = fuse([("q", {"nearest": CAPTIONS[3][0]}, _neighbours("q", [3, 2, 0], [0.9, 0.85, 0.2]))])[0]
    score = exact_scores(pool, scorer, [3, 2, 0], [0.9, 0.85, 0.2], 0.05, 0.1, 0.01, "c3")
    best = int(np.argmax(score))
    assert preprocess(out.caption) == pool.text[best]
    assert out.extra["score"] == pytest.approx(score[best], abs=TOL)
    assert pool.groups[best] != {"c3"}
    assert out.extra["source"] == ("nearest" if best == 3 else "index")


def test_a_shortlist_of_the_whole_pool_gives_the_exact_output(pool, scorer, text_model):
    settings = dict(tau=0.05, genericity=0.1, length_penalty=0.01, evidence_k=4, genericity_sample=None)
    exact = fuser(pool, scorer, text_model, {}, shortlist=None, **settings)
    whole = fuser(pool, scorer, text_model, {}, shortlist=len(pool), **settings)
    items = [(f"q{j}", {"nearest": CAPTIONS[j][0]}, _neighbours(f"q{j}", [(j + d) % 5 for d in range(1, 5)],
              [0.9, 0.8, 0.75, 0.7])) for j in range(5)]  # fmt: skip
    assert exact(items) == whole(items)


def test_a_short_shortlist_keeps_the_candidates_and_the_own_case_rule(pool, scorer, text_model):
    """A duplicate of the query's own caption planted in its case is never offered, shortlisted or not."""
    fuse = fuser(pool, scorer, text_model, {"q": "c4"}, shortlist=2, evidence_k=3, tau=None)
    nl = _neighbours("q", [2, 0, 1], [0.9, 0.5, 0.4])
    out = fuse([("q", {"nearest": CAPTIONS[2][0], "far": CAPTIONS[4][0]}, nl)])[0]
    own = {pool.text[h] for h, g in enumerate(pool.groups) if g == {"c4"}}
    assert preprocess(out.caption) not in own
    rows = fuse.scorer.shortlists([fuse.scorer.evidence("q", nl, 3, None)], ["c4"], 2)[0]
    assert len(rows) == 2 and not {pool.text[r] for r in rows} & own


def test_a_candidate_outside_the_pool_competes_on_the_same_score(pool, scorer, text_model):
    fuse = fuser(pool, scorer, text_model, {"q": "cq"}, tau=None, genericity=0, length_penalty=0, evidence_k=2,
                 sentences=False, shortlist=None)  # fmt: skip
    merged = "MRI of the brain: ring enhancing lesion in the left frontal lobe."
    out = fuse([("q", {"gen": merged}, _neighbours("q", [2, 3], [0.9, 0.9]))])[0]
    distinct = [preprocess(c) for c, _ in CAPTIONS]
    mine = scorer.block([preprocess(merged)], distinct)[0, [2, 3]].mean()
    pooled = scorer.block(distinct, distinct)[:, [2, 3]].mean(1).max()
    assert out.extra["score"] == pytest.approx(max(mine, pooled), abs=TOL)
    assert (out.caption == merged) == (mine > pooled) and (out.extra["source"] == "gen") == (mine > pooled)
    # with the candidate's own words as the evidence, it wins over every index caption
    out2 = fuse([("q", {"gen": merged}, NeighbourList("q", (Neighbour("i2", 0.9, CAPTIONS[2][0]),)))])[0]
    assert out2.caption == CAPTIONS[2][0]  # the pool's exact match scores 1: nothing beats it
    assert out2.extra["score"] == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_kernel_pads_blocks_to_few_shapes_without_changing_a_score(pool, scorer, text_model, dtype, monkeypatch):
    """Blocks padded to ROW_STEP texts x TOKEN_STEP tokens (few shapes for oneDNN to compile) score as the
    unpadded greedy matching of every row against every reference, repeated references included."""
    import torch

    import medcap.fuser.pool_score as ps
    from medcap.eval.bertscore import greedy_f1

    monkeypatch.setattr(ps, "HYP_CHUNK", 3)  # blocks of at most 3 texts, each padded to 8
    s = PoolScorer(pool, scorer, text_model, dtype=getattr(torch, dtype))
    rows, refs = np.arange(len(pool)), np.array([0, 2, 4, 4, 1])
    got = s.row_bs(rows, refs)
    want = greedy_f1(*pool.padded(rows), *pool.padded(refs)).double().numpy()
    assert got.shape == (len(pool), 5) and (got[:, 2] == got[:, 3]).all()
    np.testing.assert_allclose(got, want, atol=1e-6 if dtype == "float32" else 2e-2)
    emb, w = pool.padded([1, 6])
    assert np.allclose(s.kernel(emb, w, refs), want[[1, 6]], atol=1e-6 if dtype == "float32" else 2e-2)
