"""``medcap demo``: the whole ensemble on the embedded default, on a CPU, with models that exist offline.

Writes the synthetic phantom data set, runs the packaged ``demo`` profile (retrieval, neighbour
captioners, a prefix captioner it trains, a synthesizer, MBR and an LM-Fuser it trains), scores
every caption set, writes a submission, the ablation table and plot, and the HTML report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from medcap.config import RunConfig, load_config
from medcap.profiles import profile_path

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    run_dir: Path
    data_dir: Path
    submission: Path
    ablation: Path
    plot: Path
    report: Path
    scores: list[dict]


def demo_config(out: Path, overrides: list[str] = ()) -> RunConfig:
    """The packaged demo profile with its data and runs under ``out``."""
    base = [f"data.root={out / 'data' / 'phantom'}", f"runs_dir={out / 'runs'}"]
    return load_config(profile_path("demo"), [*base, *overrides])


def run_demo(out: str | Path = "medcap-demo", n: int = 240, overrides: list[str] = ()) -> DemoResult:
    from medcap.ablate import run_ablation
    from medcap.eval.report import write_report
    from medcap.phantom import write_phantom
    from medcap.pipeline import Pipeline, summarise_scores

    out = Path(out)
    data = out / "data" / "phantom"
    if not (data / "phantom.json").exists():
        log.info("writing %d phantom images to %s", n, data)
        write_phantom(data, n=n, seed=0)
    cfg = demo_config(out, list(overrides))
    for g in cfg.generators:  # the prefix captioner's small LM is built from the index split's captions
        if g.kind == "prefix" and g.prefix.lm == "scratch":
            from medcap.data import load_split

            captions = [ex.caption for ex in load_split(cfg.data, cfg.data.index_split).examples]
            g.prefix.lm = str(build_scratch_lm(captions, out / "models" / "scratch-lm"))
    pipe = Pipeline(cfg)
    pipe.run_stages()
    ablation = run_ablation(cfg)
    split = cfg.ablation.split or cfg.data.query_splits[-1]
    report = write_report(pipe.run.root, split=split)
    return DemoResult(
        pipe.run.root,
        data,
        pipe.run.submission(pipe.submit_variant),
        ablation.table_md,
        ablation.plot,
        report,
        summarise_scores(pipe.run),
    )


def build_scratch_lm(captions: list[str], out_dir: Path, *, layers: int = 2, hidden: int = 192, seed: int = 0) -> Path:
    """A small GPT-2 with a word-level tokenizer learned from ``captions`` (the index split's), randomly initialised.

    The demo's prefix captioner trains it from scratch with its mapper: on 2 CPU cores a 135M
    pretrained LM takes seconds a step, this one milliseconds, and the phantom captions are a
    small language. The folder loads like any causal LM (``prefix.lm: PATH``).
    """
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from medcap.runs import write_json

    if (out_dir / "config.json").is_file():
        return out_dir
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    GPT2LMHeadModel(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / "medcap_scratch.json", {"trained_on": "index split captions", "layers": layers})
    tmp.rename(out_dir)
    return out_dir
