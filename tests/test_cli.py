"""The command line a researcher expects: flags anywhere, a plan before work, smoke runs, profiles, one summary."""

import csv
import json
import shutil

import pytest
import yaml
from click.testing import CliRunner

from medcap.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def config(tmp_path, phantom_dir, tiny_clip):
    cfg = {
        "name": "cli",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid", "test"]},
        "retrieval": {"encoder": {"name": tiny_clip, "batch_size": 8}, "k": 3},
        "eval": {"suite": "imageclef2023", "metrics": ["rouge1"], "bootstrap": 0},
        "submit": {"year": 2024, "caption_set": "consensus"},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_prints_one_table_says_what_was_submitted_and_keeps_a_log(config, tmp_path):
    res = invoke("run", config, "-q")  # -q after the command's name
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "cli"
    assert "submitted: consensus -> " in res.output and "submissions/consensus.csv" in res.output
    header = next(line for line in res.output.splitlines() if line.startswith("caption set"))
    assert header.split() == ["caption", "set", "split", "n", "rouge1", "distinct"]
    rows = [line for line in res.output.splitlines() if line.startswith(("nearest ", "consensus "))]
    assert len(rows) == 4 and len({len(r) for r in rows}) == 1  # aligned: one width
    log = (run / "logs" / "run.log").read_text()
    assert "---- medcap" in log and "finished in" in log and "retrieve valid" in log


def test_dry_run_plans_without_writing_and_unknown_stages_fail_first(config, tmp_path):
    res = invoke("run", config, "--dry-run")
    assert res.exit_code == 0, res.output
    assert "embed" in res.output and "missing" in res.output and "to run" in res.output
    assert not (tmp_path / "runs").exists()
    bad = invoke("run", config, "--only", "embed", "--skip", "fusee")
    assert bad.exit_code == 2 and "'fusee' is not one of" in bad.output and "'fuse'" in bad.output
    assert not (tmp_path / "runs").exists()
    assert invoke("run", config).exit_code == 0
    again = invoke("run", config, "--dry-run", "--set", "retrieval.k=2")
    lines = {tuple(line.split()[:2]): line for line in again.output.splitlines() if line.split()}
    assert "cached" in lines[("embed", "train")] and "made with other settings" in lines[("retrieve", "valid")]


def test_limit_is_a_smoke_run_in_its_own_folder(config, tmp_path):
    res = invoke("run", config, "--limit", "3", "--skip", "submit")
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "runs" / "cli-limit3" / "neighbours" / "valid.jsonl").read_text().splitlines()
    assert len(rows) == 3 and not (tmp_path / "runs" / "cli").exists()


def test_evaluate_uses_the_runs_suite_and_never_shows_a_stale_score(config, tmp_path):
    assert invoke("run", config).exit_code == 0
    run = tmp_path / "runs" / "cli"
    assert json.loads((run / "scores" / "nearest.valid.json").read_text())["suite"] == "imageclef2023"
    shutil.rmtree(run / "candidates" / "nearest")
    res = invoke("evaluate", run)
    assert res.exit_code == 0, res.output
    assert "skipped nearest/valid: no captions" in res.output
    assert not any(line.startswith("nearest ") for line in res.output.splitlines())  # its old score is not shown
    assert any(line.startswith("consensus ") for line in res.output.splitlines())


def test_profiles_are_listed_shown_and_runnable_by_name(tmp_path):
    ls = invoke("config", "ls")
    assert ls.exit_code == 0 and all(p in ls.output for p in ("demo", "medpix-cpu", "phantom", "imageclef2024"))
    show = invoke("config", "show", "phantom", "--set", "retrieval.k=7")
    assert show.exit_code == 0 and yaml.safe_load(show.output)["retrieval"]["k"] == 7
    missing = invoke("run", "no-such-profile")
    assert missing.exit_code == 2 and "no such config file or packaged profile" in missing.output


def test_env_reports_the_machine_and_the_configs_models(config):
    res = invoke("env", config)
    assert res.exit_code == 0, res.output
    for part in ("torch", "faiss", "vllm", "java (METEOR)", "retrieval.encoder", "metric rouge1"):
        assert part in res.output, part


def test_preflight_lists_every_problem_before_any_work(config, tmp_path):
    cfg = yaml.safe_load(config.read_text())
    cfg["generators"] = [
        {"name": "nearest", "kind": "nearest"},
        {"name": "vlm", "kind": "llava", "model": str(tmp_path / "no-such-model")},
    ]
    cfg["synthesizers"] = [{"name": "synth", "model": str(tmp_path / "no-such-lm")}]
    config.write_text(yaml.safe_dump(cfg))
    res = invoke("run", config)
    assert res.exit_code == 2 and "preflight found 2 problem(s)" in res.output, res.output
    assert "generators.vlm.model" in res.output and "synthesizers.synth.model" in res.output
    assert not (tmp_path / "runs" / "cli" / "embeddings").exists()


def test_data_check_refuses_ids_no_submission_can_hold(tmp_path, phantom_dir):
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    (data / "test_concepts.csv").unlink()
    path = data / "test_captions.csv"
    rows = list(csv.reader(path.open()))
    old = rows[1][0]
    rows[1][0] = old + ",x"
    (data / "test" / f"{old}.jpg").rename(data / "test" / f"{old},x.jpg")
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    res = invoke("data", "check", data)
    assert res.exit_code == 1 and "a comma in the ID" in res.output, res.output


def test_options_with_fixed_values_list_them_and_refuse_others(tmp_path):
    help_text = invoke("evaluate", "--help").output
    assert "[imageclef2023|imageclef2024|imageclef2025|imageclef2026]" in help_text
    assert "[2023|2024|2025|2026]" in invoke("validate", "--help").output
    assert "train-fuser" in invoke("run", "--help").output
    bad = invoke("evaluate", str(tmp_path), "--suite", "imageclef2099")
    assert bad.exit_code == 2 and "'imageclef2099' is not one of" in bad.output
    bad_year = invoke("submit", str(tmp_path), "--year", "1999")
    assert bad_year.exit_code == 2 and "1999" in bad_year.output
