"""The 2026 competition profile: its eval section runs the 2026 suite and its submissions follow the 2026 rules."""

from pathlib import Path

from medcap.config import load_config
from medcap.eval.imageclef import submission_format
from medcap.eval.suites import SUITES, suite_config

PROFILE = Path(__file__).resolve().parents[1] / "medcap" / "profiles" / "imageclef2026.yaml"


def test_profile_scores_with_the_2026_suite_and_submits_a_zip():
    cfg = load_config(PROFILE)
    assert cfg.eval.suite == "imageclef2026" and cfg.eval.metrics is None
    assert cfg.eval.bertscore_model == "microsoft/deberta-xlarge-mnli"
    assert cfg.eval.bleurt_checkpoint == "lucadiliello/BLEURT-20-D12"
    assert set(SUITES["imageclef2026"].means) == {"relevance", "factuality", "overall"}
    fmt = submission_format(cfg.submit.year)
    assert cfg.submit.year == 2026 and fmt.zipped and fmt.member == "submission.csv"
    assert fmt.header == ("ID", "Caption") and fmt.ordered
    # what the evaluate stage hands the suite from this eval section is accepted
    stage_settings = ("metrics", "bootstrap", "bertscore_measure", "clip_encoder", "bleurt_checkpoint")
    suite = suite_config({k: getattr(cfg.eval, k) for k in stage_settings}, cfg.eval)
    assert suite.clip_encoder.name == "biomedclip" and suite.alignscore_model == "roberta-base"
    assert cfg.submit.caption_set in {f.name for f in cfg.fusers}
