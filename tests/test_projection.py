"""Caption-space retrieval: the ridge map, its file, its index, and the leak it refuses."""

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.config import load_config
from medcap.pipeline import Pipeline
from medcap.retrieval.projection import Projection, fit_projection, unit


def test_ridge_map_recovers_a_linear_caption_space(tmp_path):
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(400, 16)))
    x = unit(images - images.mean(0))
    true = rng.normal(size=(16, 8))
    texts = x @ true + 0.5  # caption embeddings that are a linear function of the image
    proj = fit_projection(images, texts, ridge=0.5)
    # the ridge optimum: the gradient of |xW - (T - mean T)|^2 + ridge |W|^2 vanishes
    grad = x.T @ (x @ proj.weights - (texts - texts.mean(0))) + 0.5 * proj.weights
    np.testing.assert_allclose(grad, 0.0, atol=1e-9)
    np.testing.assert_allclose(proj.text_mean, texts.mean(0), atol=1e-9)
    out = proj(images)
    assert out.dtype == np.float32 and out.shape == (400, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(out * unit(texts), axis=1)) > 0.99  # predicted ~ the (unit) caption embedding

    proj.save(tmp_path / "p.npz")
    again = Projection.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(again(images), out)
    with pytest.raises(FileNotFoundError, match="no caption-space projection"):
        Projection.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="ridge: must be positive"):
        fit_projection(images, texts, ridge=0)


def _config(tmp_path, phantom_dir, tiny_clip, **data):
    cfg = {
        "name": "cap",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid"], **data},
        "retrieval": {"encoder": {"name": tiny_clip, "batch_size": 16}, "index": {"space": "caption"}, "k": 6},
        "generators": [{"name": "nearest", "kind": "nearest"}],
        "eval": {"metrics": ["rouge1"], "specificity": False},
        "submit": {"caption_set": "nearest"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_caption_space_run_searches_projected_vectors(tmp_path, phantom_dir, tiny_clip):
    path = _config(tmp_path, phantom_dir, tiny_clip)
    res = CliRunner().invoke(main, ["run", str(path), "--only", "embed", "--only", "index", "--only", "retrieve"])
    assert res.exit_code == 0, res.output
    pipe = Pipeline(load_config(path))
    side = pipe.path("index").with_name(pipe.path("index").stem + ".projection.npz")
    proj = Projection.load(side)
    from medcap.files import read_jsonl
    from medcap.retrieval.embed import load_embeddings

    ids, train = load_embeddings(pipe.path("embed", "train"))
    qids, valid = load_embeddings(pipe.path("embed", "valid"))
    sims = proj(valid) @ proj(train).T
    groups = {ex.id: ex.group for ex in pipe.split("train").examples}
    qgroups = {ex.id: ex.group for ex in pipe.split("valid").examples}
    for row in read_jsonl(pipe.path("retrieve", "valid"))[:5]:
        q = qids.index(row["id"])
        order = [ids[j] for j in np.argsort(-sims[q]) if groups[ids[j]] != qgroups[row["id"]]][:6]
        assert [n["id"] for n in row["neighbours"]] == order  # cosine of predicted caption embeddings

    # space back to image: the projection file goes, the index is rebuilt on raw embeddings
    res = CliRunner().invoke(main, ["run", str(path), "--only", "index", "--set", "retrieval.index.space=image"])
    assert res.exit_code == 0, res.output
    assert not side.exists()


def test_caption_space_refuses_queries_inside_the_index(tmp_path, phantom_dir, tiny_clip):
    path = _config(tmp_path, phantom_dir, tiny_clip, index_split="train+valid")
    res = CliRunner().invoke(main, ["run", str(path), "--only", "embed", "--only", "index", "--only", "retrieve"])
    assert res.exit_code != 0
    assert "shares" in res.output and "index split 'train+valid'" in res.output


def test_union_split_joins_and_refuses_shared_ids(tmp_path, phantom_dir):
    from medcap.config import DataConfig
    from medcap.data import load_split
    from medcap.data.problems import InputError

    data = DataConfig(root=str(phantom_dir))
    both = load_split(data, "train+valid")
    train, valid = load_split(data, "train"), load_split(data, "valid")
    assert [e.id for e in both.examples] == [e.id for e in train.examples + valid.examples]
    with pytest.raises(InputError, match="share an image"):
        load_split(data, "train+train")
