"""The vertical slice end to end from the CLI: phantom data -> neighbours -> captions -> submission -> scores."""

import json
import shutil

import yaml
from click.testing import CliRunner

from medcap.cli import main
from medcap.files import read_jsonl
from medcap.runs import Manifest


def make_config(tmp_path, data_dir, encoder, **data):
    cfg = {
        "name": "e2e",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(data_dir), "query_splits": ["valid", "test"], **data},
        "retrieval": {"encoder": {"name": encoder, "batch_size": 8}, "k": 4},
        "eval": {"metrics": ["rouge1"]},
        "submit": {"year": 2026, "caption_set": "consensus"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def stages_run(output):
    return sorted(line.split()[1] for line in output.splitlines() if line.strip().startswith("done"))


def test_run_writes_every_artifact_then_hits_the_cache(tmp_path, phantom_dir, tiny_clip):
    config = make_config(tmp_path, phantom_dir, tiny_clip)
    first = invoke("run", config)
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "e2e"

    valid_ids = [r["ID"] for r in _csv(phantom_dir / "valid_captions.csv")]
    neighbours = read_jsonl(run / "neighbours" / "valid.jsonl")
    assert sorted(r["id"] for r in neighbours) == sorted(valid_ids)
    assert all(len(r["neighbours"]) == 4 and all(n["caption"] for n in r["neighbours"]) for r in neighbours)
    for gen in ("nearest", "consensus"):
        for split in ("valid", "test"):
            cands = read_jsonl(run / "candidates" / gen / f"{split}.jsonl")
            assert len(cands) == len(_csv(phantom_dir / f"{split}_captions.csv"))
            assert all(c["caption"] for c in cands)
            scores = json.loads((run / "scores" / f"{gen}.{split}.json").read_text())
            assert 0 < scores["metrics"]["rouge1"] <= 1
            assert len(scores["per_image"]) == len(cands)
    assert (run / "submissions" / "consensus.csv").exists()
    assert "rouge1" in first.output

    again = invoke("run", config)
    assert again.exit_code == 0 and "0 artifact(s) written" in again.output, again.output

    # a retrieval setting reruns retrieval and what follows, not the embeddings or the index
    changed = invoke("run", config, "--set", "retrieval.k=2")
    assert changed.exit_code == 0, changed.output
    ran = set(stages_run(changed.output))
    assert ran == {"retrieve", "generate", "evaluate", "submit"}
    assert all(len(r["neighbours"]) == 2 for r in read_jsonl(run / "neighbours" / "valid.jsonl"))

    # a generator setting reruns only that generator's artifacts
    only_gen = invoke("run", config, "--set", "retrieval.k=2", "--set", "generators.consensus.k=1")
    assert set(stages_run(only_gen.output)) == {"generate", "evaluate", "submit"}
    assert "candidates/nearest" not in "".join(
        line for line in only_gen.output.splitlines() if line.strip().startswith("done")
    )


def test_submission_is_valid_for_the_year_and_validate_catches_edits(tmp_path, phantom_dir, tiny_clip):
    config = make_config(tmp_path, phantom_dir, tiny_clip)
    assert invoke("run", config).exit_code == 0
    run = tmp_path / "runs" / "e2e"
    out = tmp_path / "sub2024.csv"
    res = invoke("submit", run, "--caption-set", "nearest", "--year", "2024", "-o", out)
    assert res.exit_code == 0, res.output
    testset = phantom_dir / "test_captions.csv"
    assert invoke("validate", out, "--testset", testset, "--year", "2024").exit_code == 0

    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines + [lines[-1]]))  # one ID twice
    bad = invoke("validate", out, "--testset", testset, "--year", "2024")
    assert bad.exit_code == 1 and f"line {len(lines) + 1}" in bad.output.lower(), bad.output


def test_interrupted_retrieval_resumes_without_redoing_finished_ids(tmp_path, phantom_dir, tiny_clip, monkeypatch):
    config = make_config(tmp_path, phantom_dir, tiny_clip)
    assert invoke("run", config, "--only", "embed", "--only", "index", "--only", "retrieve").exit_code == 0
    path = tmp_path / "runs" / "e2e" / "neighbours" / "valid.jsonl"
    rows = path.read_text().splitlines(keepends=True)
    # a crash after the first 3 rows, mid-way through the 4th
    path.write_text("".join(rows[:3]) + rows[3][:20])
    m = Manifest.read(path)
    Manifest(m.stage, m.key, complete=False, inputs=m.inputs).write(path)

    import medcap.retrieval.neighbours as nb

    seen = []
    real = nb.find_neighbours

    def counting(index, index_ids, query_ids, *args, **kwargs):
        seen.extend(query_ids)
        return real(index, index_ids, query_ids, *args, **kwargs)

    monkeypatch.setattr(nb, "find_neighbours", counting)
    res = invoke("retrieve", config)
    assert res.exit_code == 0, res.output
    assert len(seen) == len(rows) - 3
    assert path.read_text() == "".join(rows[:3]) + "".join(sorted(rows[3:], key=rows.index))
    assert Manifest.read(path).complete


def test_bad_image_stops_the_run_or_is_skipped_when_asked(tmp_path, phantom_dir, tiny_clip):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    victim = sorted((data / "train").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    config = make_config(tmp_path, data, tiny_clip)
    res = invoke("run", config)
    assert res.exit_code == 2 and victim.stem in res.output, res.output

    config = make_config(tmp_path, data, tiny_clip, on_error="skip")
    res = invoke("run", config)
    assert res.exit_code == 0, res.output
    rejects = (tmp_path / "runs" / "e2e" / "rejects" / "train.csv").read_text()
    assert victim.stem in rejects


def test_stage_command_without_its_inputs_says_what_to_run(tmp_path, phantom_dir, tiny_clip):
    config = make_config(tmp_path, phantom_dir, tiny_clip)
    res = invoke("generate", config)
    assert res.exit_code == 2 and "medcap retrieve CONFIG" in res.output


def test_data_check_and_synth_commands(tmp_path):
    out = tmp_path / "ph"
    assert invoke("data", "synth", out, "--n", "20", "--size", "48").exit_code == 0
    ok = invoke("data", "check", out)
    assert ok.exit_code == 0 and "OK" in ok.output
    (out / "valid_captions.csv").open("a").write("PHANTOM_dup,\n")
    bad = invoke("data", "check", out)
    assert bad.exit_code == 1 and "valid_captions.csv:" in bad.output


def _csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))
