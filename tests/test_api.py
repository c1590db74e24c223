"""The Python API: a Captioner over the run's index gives the same captions as the CLI pipeline."""

import yaml
from PIL import Image

import medcap
from medcap.files import read_jsonl


def test_captioner_matches_the_pipeline_on_the_same_images(tmp_path, phantom_dir, tiny_clip):
    cfg = {
        "name": "api",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["test"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 3, "exclude_same_group": False},
        "eval": {"metrics": ["rouge1"]},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))

    images = sorted((phantom_dir / "test").glob("*.jpg"))[:4]
    captioner = medcap.Captioner(path, generator="nearest")
    from_paths = captioner(images)
    from_pil = captioner([Image.open(p) for p in images])
    assert len(from_paths) == 4 and all(from_paths)
    assert from_pil == from_paths

    from click.testing import CliRunner

    from medcap.cli import main

    assert CliRunner().invoke(main, ["run", str(path)]).exit_code == 0
    pipeline = {
        r["id"]: r["caption"] for r in read_jsonl(tmp_path / "runs" / "api" / "candidates" / "nearest" / "test.jsonl")
    }
    assert from_paths == [pipeline[p.stem] for p in images]
    assert medcap.caption(images[:1], path, generator="nearest") == from_paths[:1]
    assert captioner([]) == []


def test_captioner_from_run_with_caption_space_and_pool_mbr(tmp_path, phantom_dir, tiny_clip):
    """The medpix-cpu design (caption-space index, pool-MBR fuser) through the API equals the pipeline's output."""
    from click.testing import CliRunner

    from medcap.cli import main

    cfg = {
        "name": "pool",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["test"]},
        "retrieval": {
            "encoder": {"name": tiny_clip},
            "index": {"space": "caption"},
            "k": 8,
            "exclude_same_group": False,
        },
        "generators": [{"name": "nearest", "kind": "nearest"}],
        "fusers": [{"name": "pool", "kind": "pool-mbr", "candidates": ["nearest"], "evidence_k": 8}],
        "eval": {"metrics": ["rouge1"], "specificity": False},
        "submit": {"caption_set": "pool"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["run", str(path)])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "pool"
    images = sorted((phantom_dir / "test").glob("*.jpg"))[:3]
    out = medcap.Captioner.from_run(run).caption(images)
    pipeline = {r["id"]: r["caption"] for r in read_jsonl(run / "fused" / "pool" / "test.jsonl")}
    assert [c.caption for c in out] == [pipeline[p.stem] for p in images]
    assert all(set(c.candidates) == {"nearest", "pool"} for c in out)
