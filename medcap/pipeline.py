"""Chains the stages through the run directory, with a cache key per artifact.

Each artifact's key hashes its stage's config and the keys of its inputs, so changing one stage's
settings reruns that stage and every stage after it, and nothing else. Keys come from the config
and the data alone, so any stage can be run by itself once its inputs exist.
"""

from __future__ import annotations

import logging
import random
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from medcap.config import RunConfig, config_hash, dump_config
from medcap.data import SplitData, load_split, write_rejects
from medcap.generators import GeneratorInputs, build_generator, needs_training, train_model
from medcap.records import Candidate, NeighbourList
from medcap.runs import (
    Manifest,
    ResumableJsonl,
    RunDir,
    borrow,
    is_fresh,
    read_json,
    read_jsonl,
    write_atomic,
    write_json,
)

log = logging.getLogger(__name__)

STAGES = ("embed", "index", "retrieve", "train", "generate", "evaluate", "submit")


class StageInputError(RuntimeError):
    """A stage's input artifact is missing or was made with other settings."""


@dataclass
class StageRun:
    stage: str
    artifact: Path
    ran: bool  # False: up to date, taken from the cache


@dataclass
class Pipeline:
    """One run: its config, its run directory, and what each stage did in this process."""

    cfg: RunConfig
    peers: list[Path] = field(default_factory=list)  # other run folders whose fresh artifacts may be reused
    history: list[StageRun] = field(default_factory=list)
    _splits: dict[str, SplitData] = field(default_factory=dict, repr=False)
    _encoder: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        root = Path(self.cfg.data.root)
        if root.exists():  # the saved config must work from any working directory
            self.cfg.data.root = str(root.resolve())
        self.run = RunDir(self.cfg.run_dir)
        write_atomic(self.run.config(), dump_config(self.cfg))

    # ------------------------------------------------------------------ data
    def split(self, name: str) -> SplitData:
        if name not in self._splits:
            data = load_split(self.cfg.data, name)
            if data.rejects:
                path = self.run.rejects(name)
                write_rejects(path, data.rejects)
                log.warning("%s: skipped %d bad row(s); see %s", name, len(data.rejects), path)
            self._splits[name] = data
        return self._splits[name]

    def data_key(self, split: str) -> str:
        """Fingerprint of a split: the data settings and every example (caption, image size and mtime)."""
        rows = []
        for ex in self.split(split).examples:
            img = ex.image
            if isinstance(img, Path):
                st = img.stat()
                img = (img.name, st.st_size, st.st_mtime_ns)
            elif isinstance(img, bytes):
                img = config_hash(img.hex())
            rows.append((ex.id, ex.caption, list(ex.concepts), ex.group, img))
        return config_hash("data", self.cfg.data.format, self.cfg.data.group_column, rows)

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys([self.cfg.data.index_split, *self.cfg.data.query_splits]))

    # ------------------------------------------------------------------ keys
    def embed_key(self, split: str) -> str:
        enc = self.cfg.retrieval.encoder
        return config_hash("embed", enc.name, enc.pretrained, enc.revision, enc.precision, self.data_key(split))

    def index_key(self) -> str:
        return config_hash("index", self.cfg.retrieval.index, self.embed_key(self.cfg.data.index_split))

    def neighbours_key(self, split: str) -> str:
        r = self.cfg.retrieval
        index_data = self.data_key(self.cfg.data.index_split)
        return config_hash("retrieve", r.k, r.exclude_same_group, self.index_key(), self.embed_key(split), index_data)

    def model_key(self, generator: str) -> str:
        """Key of a generator's trained model: what shapes training, not how it decodes or is served."""
        g, index_split = self.generator_cfg(generator), self.cfg.data.index_split
        shaping = (g.kind, g.model, g.mode, g.k, g.shot_images, g.prompt, g.max_pixels, g.lora, g.train, g.prefix)
        inputs = [self.data_key(index_split)]
        if g.kind == "prefix":
            inputs.append(self.embed_key(index_split))
        if g.mode == "few-shot":
            inputs.append(self.neighbours_key(index_split))
        return config_hash("train", shaping, inputs)

    def candidates_key(self, generator: str, split: str) -> str:
        g = self.generator_cfg(generator)
        trained = self.model_key(generator) if needs_training(g) else None
        embedded = self.embed_key(split) if g.kind == "prefix" else None
        return config_hash("generate", g, self.neighbours_key(split), trained, embedded)

    def generator_cfg(self, name: str):
        for g in self.cfg.generators:
            if g.name == name:
                return g
        raise ValueError(f"no generator named {name!r} in the config; have {[g.name for g in self.cfg.generators]}")

    def _record(self, stage: str, artifact: Path, ran: bool) -> None:
        self.history.append(StageRun(stage, artifact, ran))
        log.info("%s %s: %s", stage, artifact, "done" if ran else "up to date")

    def _cached(self, artifact: Path, key: str) -> bool:
        """Up to date here, or taken from a peer run that made it with the same key (ablation variants)."""
        return is_fresh(artifact, key) or borrow(artifact, key, self.peers, self.run.root)

    def _require(self, artifact: Path, key: str, how: str) -> None:
        if not is_fresh(artifact, key):
            raise StageInputError(f"{artifact} is missing or out of date for this config: run `{how}` first")

    # ------------------------------------------------------------------ stages
    def embed(self, split: str) -> Path:
        from medcap.retrieval.embed import embed_examples
        from medcap.retrieval.encoders import load_encoder

        out, key = self.run.embeddings(self.cfg.retrieval.encoder.name, split), self.embed_key(split)
        if self._cached(out, key):
            self._record("embed", out, False)
            return out
        if self._encoder is None:
            self._encoder = load_encoder(self.cfg.retrieval.encoder)
        embed_examples(self.cfg.retrieval.encoder, self.split(split).examples, out, key, encoder=self._encoder)
        self._record("embed", out, True)
        return out

    def build_index(self) -> Path:
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.index import build_index, save_index

        enc, split = self.cfg.retrieval.encoder.name, self.cfg.data.index_split
        out, key = self.run.index(enc), self.index_key()
        if self._cached(out, key):
            self._record("index", out, False)
            return out
        emb = self.run.embeddings(enc, split)
        self._require(emb, self.embed_key(split), "medcap embed CONFIG")
        ids, vectors = load_embeddings(emb)
        save_index(build_index(vectors, self.cfg.retrieval.index), out)
        Manifest("index", key, complete=True, inputs=(str(emb),), count=len(ids)).write(out)
        self._record("index", out, True)
        return out

    def retrieve(self, split: str) -> Path:
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.index import load_index
        from medcap.retrieval.neighbours import find_neighbours, neighbour_records

        r, enc = self.cfg.retrieval, self.cfg.retrieval.encoder.name
        out, key = self.run.neighbours(split), self.neighbours_key(split)
        if self._cached(out, key):
            self._record("retrieve", out, False)
            return out
        index_path, emb = self.run.index(enc), self.run.embeddings(enc, split)
        index_emb = self.run.embeddings(enc, self.cfg.data.index_split)
        self._require(index_path, self.index_key(), "medcap index CONFIG")
        self._require(emb, self.embed_key(split), "medcap embed CONFIG")
        index_ids, _ = load_embeddings(index_emb)
        query_ids, queries = load_embeddings(emb)
        index_examples = {ex.id: ex for ex in self.split(self.cfg.data.index_split).examples}
        query_groups = {ex.id: ex.group for ex in self.split(split).examples}

        sink = ResumableJsonl(out, "retrieve", key, inputs=(str(index_path), str(emb)))
        todo = [i for i, qid in enumerate(query_ids) if qid not in sink.done]
        if todo:
            index = load_index(index_path, r.index)
            for start in range(0, len(todo), 1024):
                rows = todo[start : start + 1024]
                ids = [query_ids[i] for i in rows]
                hits = find_neighbours(
                    index, index_ids, ids, queries[rows], r.k,
                    index_groups=[index_examples[i].group for i in index_ids],
                    query_groups=[query_groups.get(i) for i in ids],
                    exclude_same_group=r.exclude_same_group,
                )  # fmt: skip
                sink.write([n.to_json() for n in neighbour_records(hits, ids, index_examples)])
        sink.finish()
        self._record("retrieve", out, True)
        return out

    def neighbour_lists(self, split: str) -> dict[str, NeighbourList]:
        path = self.run.neighbours(split)
        self._require(path, self.neighbours_key(split), "medcap retrieve CONFIG")
        return {row["id"]: NeighbourList.from_json(row) for row in read_jsonl(path)}

    def train(self, generator: str) -> Path | None:
        """Train the generator's model (prefix captioner, LoRA adapter) on the index split, if it needs one."""
        gcfg, index_split = self.generator_cfg(generator), self.cfg.data.index_split
        if not needs_training(gcfg):
            return None
        out, key = self.run.model(generator), self.model_key(generator)
        if self._cached(out, key):
            self._record("train", out, False)
            return out
        old = Manifest.read(out)
        if old is not None and old.key != key and out.exists():
            log.info("%s: trained with other settings; training afresh", out)
            shutil.rmtree(out)
        Manifest("train", key, complete=False).write(out)  # checkpoints under `out` resume with this key
        nbs = {}
        if gcfg.mode == "few-shot":
            self.retrieve(index_split)
            nbs = self.neighbour_lists(index_split)
        embeddings = None
        if gcfg.kind == "prefix":
            embeddings = self.run.embeddings(self.cfg.retrieval.encoder.name, index_split)
            self._require(embeddings, self.embed_key(index_split), "medcap embed CONFIG")
        items = [(ex, nbs.get(ex.id)) for ex in self.split(index_split).examples]
        train_items, valid_items = holdout(items, self.cfg.seed)
        train_model(gcfg, out, train_items, valid_items, embeddings=embeddings)
        Manifest("train", key, complete=True, count=len(train_items), info={"valid": len(valid_items)}).write(out)
        self._record("train", out, True)
        return out

    def generate(self, generator: str, split: str) -> Path:
        gcfg = self.generator_cfg(generator)
        out, key = self.run.candidates(generator, split), self.candidates_key(generator, split)
        if self._cached(out, key):
            self._record("generate", out, False)
            return out
        neighbours = self.neighbour_lists(split)
        if needs_training(gcfg):
            self._require(self.run.model(generator), self.model_key(generator), f"medcap train generator {generator}")
        enc = self.cfg.retrieval.encoder.name
        inputs = GeneratorInputs(
            model_dir=self.run.model(generator),
            embeddings=self.run.embeddings(enc, split) if gcfg.kind == "prefix" else None,
            index_examples={ex.id: ex for ex in self.split(self.cfg.data.index_split).examples},
        )
        sink = ResumableJsonl(out, "generate", key, inputs=(str(self.run.neighbours(split)),))
        todo = [(ex, neighbours.get(ex.id)) for ex in self.split(split).examples if ex.id not in sink.done]
        if todo:
            generate = build_generator(gcfg, inputs)
            size = max(1, gcfg.engine.batch_size) if gcfg.kind not in ("nearest", "consensus") else 256
            try:
                for start in tqdm(
                    range(0, len(todo), size),
                    desc=f"generate {generator}/{split}",
                    unit="batch",
                    disable=len(todo) <= size,
                ):
                    sink.write([c.to_json() for c in generate(todo[start : start + size])])
            finally:
                close = getattr(generate, "close", None)
                if close is not None:
                    close()
        sink.finish()
        self._record("generate", out, True)
        return out

    def candidates(self, generator: str, split: str) -> dict[str, str]:
        path = self.run.candidates(generator, split)
        self._require(path, self.candidates_key(generator, split), "medcap generate CONFIG")
        return {c.id: c.caption for c in map(Candidate.from_json, read_jsonl(path))}

    def evaluate(self, generator: str, split: str) -> Path | None:
        from medcap.eval.metrics import evaluate

        refs = {ex.id: ex.caption for ex in self.split(split).examples}
        if any(c is None for c in refs.values()):
            log.info("evaluate: split %s has no reference captions; not scored", split)
            return None
        out = self.run.scores(generator, split)
        key = config_hash("evaluate", self.cfg.eval, self.candidates_key(generator, split), self.data_key(split))
        if self._cached(out, key):
            self._record("evaluate", out, False)
            return out
        result = evaluate(refs, self.candidates(generator, split), self.cfg.eval)
        write_json(out, {"variant": generator, "split": split, **result})
        Manifest("evaluate", key, complete=True, count=result.get("n")).write(out)
        self._record("evaluate", out, True)
        return out

    def submit(self, generator: str, split: str, year: int | None = None, out: Path | None = None) -> Path:
        from medcap.eval.submission import validate_submission, write_submission
        from medcap.problems import InputError

        year = year or self.cfg.submit.year
        out = out or self.run.submission(generator)
        key = config_hash("submit", year, split, self.candidates_key(generator, split))
        if self._cached(out, key):
            self._record("submit", out, False)
            return Path(Manifest.read(out).info.get("upload", out))
        order = [ex.id for ex in self.split(split).examples]
        written = write_submission(self.candidates(generator, split), out, year, order=order)
        problems = validate_submission(written, order, year)
        if problems:
            raise InputError(problems, f"{written}: the submission written fails the {year} rules")
        info = {"year": year, "split": split, "upload": str(written)}
        Manifest("submit", key, complete=True, count=len(order), info=info).write(out)
        self._record("submit", out, True)
        return written

    # ------------------------------------------------------------------ whole run
    @property
    def submit_split(self) -> str:
        queries = self.cfg.data.query_splits
        return "test" if "test" in queries else queries[-1]

    @property
    def submit_variant(self) -> str:
        return self.cfg.submit.variant or self.cfg.generators[-1].name

    def run_stages(self, only: Iterable[str] = (), skip: Iterable[str] = ()) -> list[StageRun]:
        """Run the stages in order (all, or ``only`` these, minus ``skip``); returns what happened."""
        wanted = [s for s in STAGES if (not only or s in only) and s not in skip]
        unknown = (set(only) | set(skip)) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {list(STAGES)}")
        gens = [g.name for g in self.cfg.generators]
        for stage in wanted:
            if stage == "embed":
                for split in self.splits:
                    self.embed(split)
            elif stage == "index":
                self.build_index()
            elif stage == "retrieve":
                for split in self.cfg.data.query_splits:
                    self.retrieve(split)
            elif stage == "train":
                for g in gens:
                    self.train(g)
            elif stage == "generate":
                for split in self.cfg.data.query_splits:
                    for g in gens:
                        self.generate(g, split)
            elif stage == "evaluate":
                for split in self.cfg.data.query_splits:
                    for g in gens:
                        self.evaluate(g, split)
            elif stage == "submit":
                self.submit(self.submit_variant, self.submit_split)
        return self.history


def holdout(items: list, seed: int, frac: float = 0.1) -> tuple[list, list]:
    """Split training items into train and a small validation part, by case so no case is in both."""
    groups = sorted({ex.group or ex.id for ex, _ in items})
    if len(groups) < 2:
        return items, items[:0]
    random.Random(seed).shuffle(groups)
    held = set(groups[: max(1, round(frac * len(groups)))])
    return [it for it in items if (it[0].group or it[0].id) not in held], [
        it for it in items if (it[0].group or it[0].id) in held
    ]


def summarise_scores(run: RunDir) -> list[dict[str, Any]]:
    """One row per scores file of a run: variant, split and corpus metrics."""
    rows = []
    for path in sorted((run.root / "scores").glob("*.json")):
        if path.name.endswith(".manifest.json"):
            continue
        s = read_json(path)
        rows.append({"variant": s["variant"], "split": s["split"], "n": s.get("n"), **s.get("metrics", {})})
    return rows
