"""Tiny offline stand-ins for the factuality backends' files, so the real AlignScore and MedCAT code runs in tests.

- an AlignScore checkpoint: a random 2-layer RoBERTa (hidden 32, a BPE tokenizer trained on a few
  captions) inside the package's own ``BERTAlignModel``, saved as a Lightning checkpoint;
- nltk's ``punkt_tab`` English parameters, empty (an untrained Punkt splitter: it splits at
  sentence-final periods), and a blank spaCy pipeline named ``en_core_web_sm`` (AlignScore's
  package loads it at start-up; the ``nli_sp`` mode never uses it);
- a MedCAT model pack with a handful of concepts (CDB built by MedCAT's own CDBMaker, a vocab of
  the caption words) saved by ``CAT.save_model_pack``.
"""

from __future__ import annotations

from pathlib import Path

TEXTS = [
    "the patient has pneumonia. ct of the chest shows a mass in the lung.",
    "mri of the brain shows no infarct.",
    "chest x-ray with pleural effusion and asthma.",
]
# (CUI, names, semantic type): T047 and T023 are MEDCON types, T999 is not
CONCEPTS = [
    ("C0032285", "pneumonia", "T047"),
    ("C0004096", "asthma", "T047"),
    ("C0032227", "pleural effusion", "T047"),
    ("C0024109", "lung|lungs", "T023"),
    ("C0006104", "brain", "T023"),
    ("C0021308", "infarct", "T999"),
]


def make_tiny_roberta(dir: Path, seed: int = 0) -> Path:
    """A random RoBERTa masked LM (2 layers, hidden 32) with a byte-level BPE tokenizer, saved to ``dir``.

    AlignScore's package picks its backbone class from the name, so ``dir``'s name must contain "roberta".
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    if "roberta" not in Path(dir).name:
        raise ValueError(f"AlignScore's package needs 'roberta' in the backbone's name, got {dir}")
    dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        TEXTS, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(dir))
    tok = RobertaTokenizerFast(
        vocab_file=str(dir / "vocab.json"), merges_file=str(dir / "merges.txt"), model_max_length=64
    )
    tok.save_pretrained(dir)
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,  # RoBERTa's positions start after the padding index
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        RobertaForMaskedLM(config).save_pretrained(dir)
    return dir


def make_tiny_alignscore(dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """(backbone folder, checkpoint file) of a random AlignScore model in the package's checkpoint format."""
    import pytorch_lightning as pl
    import torch
    from alignscore.model import BERTAlignModel

    backbone = make_tiny_roberta(dir / "tiny-roberta", seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BERTAlignModel(model=str(backbone))
    ckpt = dir / "AlignScore-tiny.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {"model": str(backbone), "using_pretrained": True},
            "pytorch-lightning_version": pl.__version__,
        },
        ckpt,
    )
    return backbone, ckpt


def make_sentence_tools(dir: Path) -> tuple[Path, Path]:
    """(nltk data folder with an empty English punkt_tab, folder holding a blank spaCy ``en_core_web_sm``)."""
    import spacy

    punkt = dir / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    punkt.mkdir(parents=True, exist_ok=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (punkt / name).write_text("")
    spacy_dir = dir / "spacy"
    spacy_dir.mkdir(parents=True, exist_ok=True)
    spacy.blank("en").to_disk(spacy_dir / "en_core_web_sm")
    return dir / "nltk_data", spacy_dir


def make_tiny_medcat_pack(dir: Path) -> Path:
    """A MedCAT model pack (zip) of :data:`CONCEPTS`, built and saved by MedCAT's own code."""
    import os

    os.environ.setdefault("MEDCAT_DISABLE_VERSION_CHECK", "true")
    import numpy as np
    import pandas as pd
    from medcat.cat import CAT
    from medcat.config import Config
    from medcat.model_creation.cdb_maker import CDBMaker
    from medcat.vocab import Vocab

    frame = pd.DataFrame([{"cui": c, "name": n, "type_ids": t} for c, n, t in CONCEPTS])
    cdb = CDBMaker(Config()).prepare_csvs([frame], full_build=True)  # full: keeps the semantic types
    vocab = Vocab()
    rng = np.random.default_rng(0)
    for word in sorted({w.strip(".") for text in TEXTS for w in text.split()}):
        vocab.add_word(word, 10, rng.normal(size=8).astype(np.float32))
    dir.mkdir(parents=True, exist_ok=True)
    return Path(CAT(cdb, vocab).save_model_pack(str(dir), pack_name="tiny_medcat") + ".zip")
