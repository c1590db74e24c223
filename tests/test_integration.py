"""The vertical slice on real data (../shared/data/medpix2); run with `pytest -m integration`."""

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SHARED_DATA

from medcap.cli import main

MEDPIX = SHARED_DATA / "medpix2"
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not MEDPIX.is_dir(), reason=f"real data not found at {MEDPIX}")
def test_medpix2_run_writes_neighbours_candidates_submission_and_scores(tmp_path):
    config = tmp_path / "medpix2.yaml"
    shutil.copy(REPO / "medcap" / "profiles" / "medpix2.yaml", config)
    args = ["run", str(config), "--set", f"data.root={MEDPIX}", "--set", f"runs_dir={tmp_path}"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / "medpix2"
    scores = json.loads((run / "scores" / "consensus.valid.json").read_text())
    assert scores["n"] == 191 and 0 < scores["metrics"]["rouge1"] < 1
    check = CliRunner().invoke(
        main, ["validate", str(run / "submissions" / "consensus.csv"), "--testset", str(MEDPIX / "valid_captions.csv")]
    )
    assert check.exit_code == 0, check.output
