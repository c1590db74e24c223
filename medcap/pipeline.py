"""Chains the stages through the run directory, with a cache key per artifact.

Each artifact's key hashes its stage's config and the keys of its inputs, so changing one stage's
settings reruns that stage and every stage after it, and nothing else. Keys come from the config
and the data alone, so any stage can be run by itself once its inputs exist.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.config import FusionConfig, GeneratorConfig, RunConfig, SynthesizerConfig, config_hash, dump_config
from medcap.data import SplitData, load_split, write_rejects
from medcap.generators import needs_training
from medcap.records import Candidate, NeighbourList
from medcap.runs import (
    Manifest,
    ResumableJsonl,
    RunDir,
    borrow,
    is_fresh,
    read_jsonl,
    run_lock,
    write_atomic,
)

log = logging.getLogger(__name__)

STAGES = ("embed", "index", "retrieve", "train", "generate", "synthesize", "fuse", "evaluate", "submit")


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
    _data_keys: dict[str, str] = field(default_factory=dict, repr=False)

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
        if split in self._data_keys:  # every downstream key needs it; the data do not change during a run
            return self._data_keys[split]
        rows = []
        for ex in self.split(split).examples:
            img = ex.image
            if isinstance(img, Path):
                st = img.stat()
                img = (img.name, st.st_size, st.st_mtime_ns)
            elif isinstance(img, bytes):
                img = config_hash(img.hex())
            rows.append((ex.id, ex.caption, list(ex.concepts), ex.group, img))
        self._data_keys[split] = config_hash("data", self.cfg.data.format, self.cfg.data.group_column, rows)
        return self._data_keys[split]

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

    def record(self, stage: str, artifact: Path, ran: bool) -> None:
        self.history.append(StageRun(stage, artifact, ran))
        log.info("%s %s: %s", stage, artifact, "done" if ran else "up to date")

    def cached(self, artifact: Path, key: str) -> bool:
        """Up to date here, or taken from a peer run that made it with the same key (ablation variants)."""
        return is_fresh(artifact, key) or borrow(artifact, key, self.peers, self.run.root)

    def require(self, artifact: Path, key: str, how: str) -> None:
        if not is_fresh(artifact, key):
            raise StageInputError(f"{artifact} is missing or out of date for this config: run `{how}` first")

    # ------------------------------------------------------------------ stages
    def embed(self, split: str) -> Path:
        from medcap.retrieval.embed import embed_examples
        from medcap.retrieval.encoders import load_encoder

        out, key = self.run.embeddings(self.cfg.retrieval.encoder.name, split), self.embed_key(split)
        if self.cached(out, key):
            self.record("embed", out, False)
            return out
        if self._encoder is None:
            self._encoder = load_encoder(self.cfg.retrieval.encoder)
        embed_examples(self.cfg.retrieval.encoder, self.split(split).examples, out, key, encoder=self._encoder)
        self.record("embed", out, True)
        return out

    def build_index(self) -> Path:
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.index import build_index, save_index

        enc, split = self.cfg.retrieval.encoder.name, self.cfg.data.index_split
        out, key = self.run.index(enc), self.index_key()
        if self.cached(out, key):
            self.record("index", out, False)
            return out
        emb = self.run.embeddings(enc, split)
        self.require(emb, self.embed_key(split), "medcap embed CONFIG")
        ids, vectors = load_embeddings(emb)
        save_index(build_index(vectors, self.cfg.retrieval.index), out)
        Manifest("index", key, complete=True, inputs=(str(emb),), count=len(ids)).write(out)
        self.record("index", out, True)
        return out

    def retrieve(self, split: str) -> Path:
        from medcap.retrieval.embed import load_embeddings
        from medcap.retrieval.index import load_index
        from medcap.retrieval.neighbours import find_neighbours, neighbour_records

        r, enc = self.cfg.retrieval, self.cfg.retrieval.encoder.name
        out, key = self.run.neighbours(split), self.neighbours_key(split)
        if self.cached(out, key):
            self.record("retrieve", out, False)
            return out
        index_path, emb = self.run.index(enc), self.run.embeddings(enc, split)
        index_emb = self.run.embeddings(enc, self.cfg.data.index_split)
        self.require(index_path, self.index_key(), "medcap index CONFIG")
        self.require(emb, self.embed_key(split), "medcap embed CONFIG")
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
        self.record("retrieve", out, True)
        return out

    def neighbour_lists(self, split: str) -> dict[str, NeighbourList]:
        path = self.run.neighbours(split)
        self.require(path, self.neighbours_key(split), "medcap retrieve CONFIG")
        return {row["id"]: NeighbourList.from_json(row) for row in read_jsonl(path)}

    def train(self, generator: str) -> Path | None:
        """Train the generator's model (prefix captioner, LoRA adapter) on the index split, if it needs one."""
        from medcap.generators import stage

        return stage.train(self, generator)

    def generate(self, generator: str, split: str) -> Path:
        from medcap.generators import stage

        return stage.generate(self, generator, split)

    def synthesize(self, name: str, split: str) -> Path:
        from medcap.synthesizer import stage

        return stage.synthesize(self, name, split)

    def train_fuser(self, name: str) -> Path | None:
        from medcap.fuser import stage

        return stage.train_fuser(self, name)

    def fuse(self, name: str, split: str) -> Path | None:
        from medcap.fuser import stage

        return stage.fuse(self, name, split)

    # ------------------------------------------------------------------ outputs: every caption set
    @property
    def outputs(self) -> list[str]:
        """Every caption set of the run, in pipeline order: generators, synthesizers, fusers."""
        return [o.name for o in (*self.cfg.generators, *self.cfg.synthesizers, *self.cfg.fusers)]

    def output_cfg(self, name: str):
        for o in (*self.cfg.generators, *self.cfg.synthesizers, *self.cfg.fusers):
            if o.name == name:
                return o
        raise ValueError(f"no generator, synthesizer or fuser named {name!r}; have {self.outputs}")

    def output_path(self, name: str, split: str) -> Path:
        o = self.output_cfg(name)
        if isinstance(o, SynthesizerConfig):
            return self.run.synthesis(name, split)
        if isinstance(o, FusionConfig):
            return self.run.fused(name, split)
        return self.run.candidates(name, split)

    def inputs_of(self, name: str) -> list[str]:
        """The caption sets a synthesizer or fuser reads (default: every generator, and synthesizers for fusers)."""
        o = self.output_cfg(name)
        if o.candidates:
            return list(o.candidates)
        names = [g.name for g in self.cfg.generators]
        return names + [s.name for s in self.cfg.synthesizers] if isinstance(o, FusionConfig) else names

    def output_key(self, name: str, split: str) -> str:
        o = self.output_cfg(name)
        if isinstance(o, GeneratorConfig):
            return self.candidates_key(name, split)
        inputs = [self.output_key(i, split) for i in self.inputs_of(name)]
        if isinstance(o, SynthesizerConfig):
            return config_hash("synthesize", o, inputs, self.neighbours_key(split))
        extra = []
        if o.kind == "lm":
            extra.append(self.fuser_model_key(name))
        if o.kind == "rerank":
            extra.append(self.embed_key(split))
        if o.kind == "lm" and o.use_neighbours:
            extra.append(self.neighbours_key(split))
        return config_hash("fuse", o, inputs, extra)

    def fuser_model_key(self, name: str) -> str:
        o = self.output_cfg(name)
        inputs = [self.output_key(i, o.train_split) for i in self.inputs_of(name)]
        nb = self.neighbours_key(o.train_split) if o.use_neighbours else None
        shaping = (o.model, o.use_neighbours, o.k, o.lora, o.train, self.inputs_of(name))
        return config_hash("train-fuser", shaping, inputs, nb, self.data_key(o.train_split))

    def captions(self, name: str, split: str) -> dict[str, str]:
        """The captions of any caption set (generator, synthesizer, fuser) for a split, by image ID."""
        path = self.output_path(name, split)
        self.require(path, self.output_key(name, split), "medcap run CONFIG")
        return {c.id: c.caption for c in map(Candidate.from_json, read_jsonl(path))}

    def evaluate(self, name: str, split: str) -> Path | None:
        """Score a caption set with the eval suite (``medcap/eval/stage.py``)."""
        from medcap.eval import stage

        return stage.evaluate(self, name, split)

    def submit(self, name: str, split: str, year: int | None = None, out: Path | None = None) -> Path:
        """Write and validate a submission file (``medcap/eval/stage.py``)."""
        from medcap.eval import stage

        return stage.submit(self, name, split, year, out)

    # ------------------------------------------------------------------ whole run
    @property
    def submit_split(self) -> str:
        queries = self.cfg.data.query_splits
        return "test" if "test" in queries else queries[-1]

    @property
    def submit_variant(self) -> str:
        return self.cfg.submit.variant or self.outputs[-1]

    def run_stages(self, only: Iterable[str] = (), skip: Iterable[str] = ()) -> list[StageRun]:
        """Run the stages in order (all, or ``only`` these, minus ``skip``); returns what happened."""
        wanted = [s for s in STAGES if (not only or s in only) and s not in skip]
        unknown = (set(only) | set(skip)) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {list(STAGES)}")
        with run_lock(self.run.root):
            for stage in wanted:
                self._run_stage(stage)
        return self.history

    def _run_stage(self, stage: str) -> None:
        """One stage over every split and caption set it applies to."""
        gens = [g.name for g in self.cfg.generators]
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
        elif stage == "synthesize":
            for split in self.cfg.data.query_splits:
                for syn in self.cfg.synthesizers:
                    self.synthesize(syn.name, split)
        elif stage == "fuse":
            for fuser in self.cfg.fusers:
                self.train_fuser(fuser.name)
                for split in self.cfg.data.query_splits:
                    self.fuse(fuser.name, split)
        elif stage == "evaluate":
            for split in self.cfg.data.query_splits:
                for name in self.outputs:
                    if self.output_path(name, split).exists() or name in gens:
                        self.evaluate(name, split)
        elif stage == "submit":
            self.submit(self.submit_variant, self.submit_split)
