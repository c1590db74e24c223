"""`medcap demo` end to end at tiny scale: the packaged profile with tiny models swapped in through --set."""

from click.testing import CliRunner
from tiny_vlms import make_tiny_llama

from medcap.cli import main


def test_demo_writes_report_submission_and_ablation(tmp_path, tiny_clip):
    llama = str(make_tiny_llama(tmp_path / "llama"))
    swaps = {
        "retrieval.encoder.name": tiny_clip,
        "generators.prefix.train.max_steps": 2,
        "generators.prefix.generation.max_new_tokens": 6,
        "synthesizers.synth.model": llama,
        "synthesizers.synth.generation.max_new_tokens": 6,
        "fusers.lmf.model": llama,
        "fusers.lmf.train.max_steps": 1,
        "fusers.lmf.generation.max_new_tokens": 6,
        "eval.metrics": "[rouge1]",
        "ablation.n_boot": 50,
    }
    args = ["demo", "--out", str(tmp_path / "demo"), "--n", "30"]
    for key, value in swaps.items():
        args += ["--set", f"{key}={value}"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / "demo" / "runs" / "demo"
    for path in ("report.html", "ablation.md", "ablation.png", "submissions/lmf.csv"):
        assert (run / path).is_file(), path
    assert "demo finished in" in res.output and "report" in res.output
    table = (run / "ablation.md").read_text()
    assert all(v in table for v in ("nearest", "prefix", "synth", "mbr", "lmf"))

    # the Python API captions new images with the demo's whole trained ensemble
    import medcap

    captioner = medcap.Captioner.from_run(run)
    images = sorted((tmp_path / "demo" / "data" / "phantom" / "test").glob("*.jpg"))[:2]
    out = captioner.caption(images)
    assert [c.caption for c in out] == captioner(images)
    assert all(set(c.candidates) == {"nearest", "consensus", "prefix", "synth", "mbr", "ranker", "lmf"} for c in out)
    assert all(c.caption == c.candidates["lmf"] for c in out)
    assert not (run / "api" / "models" / "prefix").is_symlink()  # the run's models were linked, not retrained
    assert not any(s.ran and s.stage in ("train", "train-fuser", "index") for s in captioner.pipeline.history)
