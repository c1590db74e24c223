"""The learned ranker: a fuser that learns which hypothesis of an image's pool fits it.

For each image it takes pool-MBR's list (``fuser/pool_mbr.py``: the shortlist scored against the
neighbours' captions, its ``top`` best plus every caption set's candidate), describes each hypothesis
by pool-MBR's terms and more (``ranker_features.py``), and picks the one its model
(``ranker_model.py``) scores highest.

It trains on the index split by cross-fitting, exactly as it is used on a test image: every training
image's neighbours come from ``retrieve`` of the index split (caption space: searched with a map fitted
without the image's fold), its pool never offers a hypothesis that only its own case wrote, and its
caption sets' candidates come from models that did not train on it (the leakage guard checks the
files). At most ``max_train_images`` images (a seeded sample of cases) and ``top`` + candidates
hypotheses per image: training stays linear in the index. The model's settings are chosen by inner
case-grouped folds (``ranker_model.select_and_fit``); ``medcap ablate --cv K`` reports it on outer folds.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medcap.config import ConfigError, TrainConfig
from medcap.files import write_atomic
from medcap.fuser import Fuse, Item
from medcap.fuser.pool_mbr import PoolMBRConfig, PoolMBRKind, pool_scorer, projected_queries, score_hypotheses
from medcap.keys import key_settings
from medcap.models.distributed import world
from medcap.records import Candidate

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

DATA = "lists.npz"  # the training lists (features, utilities), kept so a restarted training skips them
OOF = "oof.jsonl"  # the training split's own choices, each by the inner model that did not learn from it
LIST_SHARD = 64  # training images whose lists are made and written at once (the resumable unit)
ALTERNATIVES = 5  # hypotheses each row lists best first ("alternatives"): a generative fuser may read them


def _ranker_train() -> TrainConfig:
    return TrainConfig(max_steps=300, batch_size=64, grad_accum=1, lr=3e-3, warmup_ratio=0.05, weight_decay=1e-4,
                       eval_every=10**9, save_every=100)  # fmt: skip


@dataclass
class RankerConfig(PoolMBRConfig):
    """The ranker: pool-MBR's settings make each image's list; these say how it learns to choose from it."""

    kind: str = "ranker"
    top: int = 32  # pool-MBR's best hypotheses per image that the model ranks (plus every candidate)
    bs_weight: float = 0.5  # utility = bs_weight * BERTScore + (1 - bs_weight) * ROUGE-1 against the reference
    hidden: list[int] = field(default_factory=lambda: [0, 32])  # model widths the inner folds choose from (0: linear)
    temperature: list[float] = field(default_factory=lambda: [0.02, 0.05])  # ListNet target temperatures to choose from
    inner_folds: int = 3  # case-grouped folds of the training images that choose hidden x temperature
    max_train_images: int = 5000  # training images at most (a seeded sample of cases)
    train_split: str | None = None  # the split it learns from; None: the index split (cross-fitted)
    train: TrainConfig = field(default_factory=_ranker_train)

    def check(self, where: str) -> None:
        super().check(where)
        if self.shortlist is None:
            raise ConfigError(
                f"{where}.shortlist: the ranker needs a shortlist (the exact pool is pool-mbr's baseline)"
            )
        if not self.hidden or not self.temperature:
            raise ConfigError(f"{where}: hidden and temperature need at least one value each")


def ranked_lists(pipe: Pipeline, cfg: RankerConfig, split: str, items: list[Item], scorer: Any, projected: dict,
                 groups: dict[str, str]) -> list[tuple[Any, Any, np.ndarray]]:  # fmt: skip
    """Per item: (pool-MBR's scored list cut to ``top`` + candidates, evidence, features)."""
    from medcap.fuser.pool_mbr import _with
    from medcap.fuser.ranker_features import RougeBags, features

    rouge = pipe.resource(("rouge-bags",), RougeBags)
    names = pipe.inputs_of(cfg.name)
    evidences = [scorer.evidence(i, nl, cfg.evidence_k, cfg.tau) for i, _, nl in items]
    grp = [groups.get(i, i) for i, _, _ in items]
    found = scorer.shortlists(evidences, grp, cfg.shortlist)
    out = []
    for (image_id, candidates, _), ev, rows, g in zip(items, evidences, found, grp, strict=True):
        rows = _with(rows, scorer.candidate_rows(candidates, g))
        s = score_hypotheses(cfg, scorer, scorer, ev, rows, candidates, projected.get(image_id))
        keep = _top(s, cfg.top)
        s = _cut(s, keep)
        out.append((s, ev, features(s, ev, scorer.pool, rouge, names)))
    return out


def _top(s: Any, top: int) -> np.ndarray:
    best = np.argsort(-s.score, kind="stable")[:top]
    cands = [k for k, src in enumerate(s.sources) if src != "index"]
    return np.array(sorted(set(best.tolist()) | set(cands)), dtype=np.int64)


def _cut(s: Any, keep: np.ndarray) -> Any:
    from dataclasses import replace

    ex = np.where(s.rows[keep] < 0)[0]
    extra_k = np.cumsum(s.rows < 0)[keep[ex]] - 1  # positions among the candidates outside the pool
    emb, w = s.extra_tokens
    return replace(
        s, rows=s.rows[keep], texts=[s.texts[k] for k in keep], pre=[s.pre[k] for k in keep],
        sources=[s.sources[k] for k in keep], bs=s.bs[keep], expected=s.expected[keep], genericity=s.genericity[keep],
        log_len=s.log_len[keep], image_text=s.image_text[keep], score=s.score[keep],
        extra_tokens=(emb[extra_k], w[extra_k]),
    )  # fmt: skip


class Ranker:
    """The fuse function: pool-MBR's list for each image, the model's choice from it."""

    def __init__(self, pipe: Pipeline, cfg: RankerConfig, split: str, net: Any):
        self.pipe, self.cfg, self.split, self.net = pipe, cfg, split, net
        self.scorer = pool_scorer(pipe, cfg)
        self.projected = projected_queries(pipe, split) if cfg.image_text else {}
        self.groups = {ex.id: str(ex.group or ex.id) for ex in pipe.split(split).examples}

    def __call__(self, items: list[Item]) -> list[Candidate]:
        from medcap.fuser.ranker_model import orders

        lists = ranked_lists(self.pipe, self.cfg, self.split, items, self.scorer, self.projected, self.groups)
        picks = orders(self.net, [f for _, _, f in lists])
        out = []
        for (image_id, _, _), (s, _, _), order in zip(items, lists, picks, strict=True):
            k = int(order[0])
            mbr_rank = int((s.score > s.score[k]).sum())
            extra = {"source": s.sources[k], "mbr_rank": mbr_rank, "score": round(float(s.score[k]), 6),
                     "alternatives": [s.texts[j] for j in order[:ALTERNATIVES]]}  # fmt: skip
            out.append(Candidate(image_id, s.texts[k], self.cfg.name, extra))
        return out


class RankerKind(PoolMBRKind):
    """Trained (train-fuser stage) on the index split's cross-fitted lists; fuses every query split."""

    def trains(self, cfg: RankerConfig) -> bool:
        return True

    def train_split(self, pipe: Pipeline, cfg: RankerConfig) -> str:
        return cfg.train_split or pipe.cfg.data.index_split

    def train_settings(self, cfg: RankerConfig) -> Any:
        return key_settings(cfg)

    def train_needs(self, pipe: Pipeline, cfg: RankerConfig) -> list[tuple]:
        return super().needs(pipe, cfg, self.train_split(pipe, cfg))

    def needs(self, pipe: Pipeline, cfg: RankerConfig, split: str) -> list[tuple]:
        return [*super().needs(pipe, cfg, split), ("train-fuser", cfg.name)]

    def train(self, pipe: Pipeline, cfg: RankerConfig, out: Path) -> None:
        from medcap.fuser.leakage import check_fuser_inputs
        from medcap.fuser.ranker_model import ListData, select_and_fit

        split = self.train_split(pipe, cfg)
        examples = [ex for ex in _sample(pipe.split(split).examples, cfg.max_train_images, pipe.cfg.seed)]
        if not examples:
            raise ValueError(f"fuser {cfg.name}: split {split!r} has no captioned image to learn from")
        check_fuser_inputs(pipe, cfg.name, split)
        data_path = out / DATA
        w = world()
        with w.main_first():  # under a launcher rank 0 makes the lists, the others read them
            if data_path.is_file():
                data = ListData.load(data_path)
            else:
                data = self.lists(pipe, cfg, split, examples, out / "lists.partial")
                data.save(data_path)
                shutil.rmtree(out / "lists.partial", ignore_errors=True)
        grid = [(h, t) for h in cfg.hidden for t in cfg.temperature]
        _, report, oof = select_and_fit(
            data, grid, cfg.inner_folds, cfg.train, out, pipe.cfg.seed, f"ranker {cfg.name}"
        )
        rows = []
        for k, (fold, order) in sorted(oof.items()):
            texts = [str(data.texts[k][j]) for j in order[:ALTERNATIVES]]
            rows.append(
                {"id": data.ids[k], "caption": texts[0], "generator": cfg.name, "fold": fold, "alternatives": texts}
            )
        if w.is_main:
            shutil.rmtree(out / "inner", ignore_errors=True)
            write_atomic(out / OOF, "".join(json.dumps(r) + "\n" for r in rows))
        w.barrier()
        log.info("%s: chose hidden %d, temperature %g on %d images", cfg.name, report["hidden"], report["temperature"],
                 report["images"])  # fmt: skip

    def lists(self, pipe: Pipeline, cfg: RankerConfig, split: str, examples: list, partial: Path) -> Any:
        """Every training image's list, features and utilities against its own reference; written in shards of
        ``LIST_SHARD`` images under ``partial`` (a crash loses one), joined at the end."""
        from medcap.files import batched
        from medcap.fuser.ranker_model import ListData
        from medcap.logs import progress

        scorer = pool_scorer(pipe, cfg)
        projected = projected_queries(pipe, split) if cfg.image_text else {}
        groups = {ex.id: str(ex.group or ex.id) for ex in examples}
        neighbours = pipe.neighbour_lists(split)
        captions = {i: pipe.captions(i, split) for i in pipe.inputs_of(cfg.name)}
        shards = list(batched(examples, LIST_SHARD))
        parts = []
        for k, batch in enumerate(progress(shards, desc=f"ranker {cfg.name} lists", unit="shard")):
            path = partial / f"{k:05d}.npz"
            if not path.is_file():
                self._shard(pipe, cfg, split, batch, scorer, projected, groups, neighbours, captions).save(path)
                log.debug(
                    "%s: lists of %d/%d images", cfg.name, min((k + 1) * LIST_SHARD, len(examples)), len(examples)
                )
            parts.append(ListData.load(path))
        return ListData(*([x for part in parts for x in getattr(part, f)] for f in ListData.FIELDS))

    def _shard(self, pipe, cfg, split, batch, scorer, projected, groups, neighbours, captions) -> Any:
        from medcap.fuser.ranker_features import RougeBags, utilities
        from medcap.fuser.ranker_model import ListData

        rouge = pipe.resource(("rouge-bags",), RougeBags)
        data = ListData(*([] for _ in ListData.FIELDS))
        items = [(ex.id, {i: c[ex.id] for i, c in captions.items()}, neighbours[ex.id]) for ex in batch]
        for ex, (s, _, feats) in zip(batch, ranked_lists(pipe, cfg, split, items, scorer, projected, groups),
                                     strict=True):  # fmt: skip
            bs, r1 = utilities(s, scorer.pool.image_row[ex.id], scorer, rouge)
            data.ids.append(ex.id)
            data.groups.append(groups[ex.id])
            data.features.append(feats.astype(np.float32))
            data.utility.append((cfg.bs_weight * bs + (1 - cfg.bs_weight) * r1).astype(np.float32))
            data.rows.append(s.rows.astype(np.int64))
            data.bs.append(bs.astype(np.float32))
            data.r1.append(r1.astype(np.float32))
            data.texts.append(np.array(s.texts, dtype=str))
        return data

    def build(self, pipe: Pipeline, cfg: RankerConfig, split: str) -> Fuse:
        from medcap.fuser.ranker_model import FINAL, load_net

        if cfg.image_text and pipe.cfg.retrieval.index.space != "caption":
            raise ConfigError(f"fusers.{cfg.name}.image_text needs retrieval.index.space: caption (or image_text: 0)")
        if split == self.train_split(pipe, cfg):  # its own training images: the out-of-fold choices
            return out_of_fold(pipe.run.model(cfg.name), cfg)
        return Ranker(pipe, cfg, split, load_net(pipe.run.model(cfg.name) / FINAL))


def out_of_fold(model_dir: Path, cfg: RankerConfig) -> Fuse:
    """The fuse function of the ranker's own training split: each image's choice by the inner model of the
    fold it was held out of (cross-fitted), for a fuser that learns from the ranker's output."""
    from medcap.files import read_jsonl

    path = model_dir / OOF
    rows = {r["id"]: r for r in read_jsonl(path)} if path.is_file() else {}

    def fuse(items: list[Item]) -> list[Candidate]:
        missing = [i for i, _, _ in items if i not in rows]
        if missing:
            raise ValueError(
                f"fuser {cfg.name}: no out-of-fold choice for {len(missing)} of its training images (e.g. {missing[0]}): "
                f"they were not among its max_train_images={cfg.max_train_images}, or inner_folds < 2"
            )
        return [Candidate(i, rows[i]["caption"], cfg.name, {k: v for k, v in rows[i].items() if k not in
                ("id", "caption", "generator")}) for i, _, _ in items]  # fmt: skip

    return fuse


def _sample(examples: list, n: int, seed: int) -> list:
    """Captioned index images, at most ``n``: whole cases, drawn with the seed."""
    captioned = [ex for ex in examples if (ex.caption or "").strip()]
    if len(captioned) <= n:
        return captioned
    cases = sorted({str(ex.group or ex.id) for ex in captioned})
    rng = np.random.default_rng([seed, 11])
    keep, count, by_case = set(), 0, {}
    for ex in captioned:
        by_case.setdefault(str(ex.group or ex.id), []).append(ex)
    for c in rng.permutation(cases):
        if count >= n:
            break
        keep.add(c)
        count += len(by_case[c])
    return [ex for ex in captioned if str(ex.group or ex.id) in keep]


RANKER = RankerKind()
