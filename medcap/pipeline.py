"""The generic runner: stages declare their artifacts, inputs and settings; the runner chains them.

A run is the set of artifacts its config asks for. Each artifact is made by one stage for one
target (a split; a caption set and a split; a model): ``Pipeline.make(stage, *target)`` returns its
path, taken from the cache when its manifest carries the expected key, else made after its inputs.
An artifact's key hashes its stage's name, the settings the stage declares for it and the keys of
its inputs, so a changed setting reruns that stage and every stage after it, and nothing else.
Keys come from the config and the data alone, so any stage can run by itself once its inputs exist.

The runner knows no stage or kind: stages are looked up by name in ``STAGES`` (imported when first
used), caption sets by their config section. Which stages may run in a command is its ``allowed``
set; an input whose stage may not run must already be fresh, or the command says what to run first.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.config import RunConfig, SynthesizerConfig, config_hash, dump_config
from medcap.data import SplitData, write_rejects
from medcap.files import read_jsonl, write_atomic
from medcap.models.distributed import env_rank
from medcap.records import Candidate, Example, NeighbourList
from medcap.registry import Registry
from medcap.runs import RunDir, borrow, is_fresh, run_lock
from medcap.tasks import SPLIT_READERS, STAGES, TASKS

log = logging.getLogger(__name__)

Need = tuple  # (stage name, *target)


class StageInputError(RuntimeError):
    """A stage's input artifact is missing or was made with other settings."""


class Stage:
    """One stage: the artifacts it makes for a run, their paths, inputs and settings, and how to make one."""

    name = ""
    command = "medcap run CONFIG"  # how a user makes this stage's artifacts alone

    def targets(self, pipe: Pipeline) -> list[tuple]:
        """The artifacts a whole run asks of this stage."""
        return []

    def path(self, pipe: Pipeline, *t: Any) -> Path:
        raise NotImplementedError

    def needs(self, pipe: Pipeline, *t: Any) -> list[Need]:
        """Input artifacts, as (stage, *target): their keys enter this artifact's key."""
        return []

    def settings(self, pipe: Pipeline, *t: Any) -> Any:
        """Everything besides its inputs that shapes the artifact (config sections, data fingerprints, seeds)."""
        return None

    def make(self, pipe: Pipeline, out: Path, key: str, *t: Any) -> None:
        """Write the artifact ``out`` and, last, its manifest with ``key``."""
        raise NotImplementedError

    def hint(self, pipe: Pipeline, *t: Any) -> str:
        return self.command


@dataclass
class StageRun:
    stage: str
    artifact: Path
    ran: bool  # False: up to date, taken from the cache


@dataclass(frozen=True)
class CaptionSet:
    """Anything that writes one caption per image: a generator, a synthesizer or a fuser."""

    name: str
    stage: str  # generate | synthesize | fuse
    cfg: Any


_instances: dict[str, Stage] = {}


def get_stage(name: str) -> Stage:
    """The stage registered under ``name`` (imported on first use)."""
    if name not in _instances:
        registry = next((stages for stages, _ in TASKS.values() if name in stages), STAGES)
        _instances[name] = registry.get(name)()
    return _instances[name]


@dataclass
class Pipeline:
    """One run: its config, its run folder, and what each stage did in this process."""

    cfg: RunConfig
    peers: list[Path] = field(default_factory=list)  # other run folders whose fresh artifacts may be reused
    history: list[StageRun] = field(default_factory=list)
    allowed: set[str] | None = None  # stages that may run in this command (None: all)
    launcher: str | None = None  # hand every training stage to this launcher (accelerate | torchrun; medcap/launch.py)
    derived: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # split -> (parents, IDs)
    _splits: dict[str, SplitData] = field(default_factory=dict, repr=False)
    _data_keys: dict[str, str] = field(default_factory=dict, repr=False)
    _keys: dict[tuple, str] = field(default_factory=dict, repr=False)
    _resources: dict[Any, Any] = field(default_factory=dict, repr=False)
    _sessions: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        root = Path(self.cfg.data.root)
        if root.exists():  # the saved config must work from any working directory
            self.cfg.data.root = str(root.resolve())
        self.run = RunDir(self.cfg.run_dir)

    # ------------------------------------------------------------------ data
    def split(self, name: str) -> SplitData:
        if name not in self._splits and name in self.derived:
            parents, ids = self.derived[name]
            by_id = {ex.id: ex for p in parents for ex in self.split(p).examples}
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise ValueError(f"split {name!r}: {len(missing)} ID(s) not in {parents}, e.g. {missing[0]!r}")
            self._splits[name] = SplitData(name, [by_id[i] for i in ids])
        if name not in self._splits:
            data = SPLIT_READERS.get(self.cfg.task)(self.cfg.data, name)
            if self.cfg.data.limit is not None:
                n = self.cfg.data.limit
                data = SplitData(data.split, data.examples[:n], data.rejects, data.ids[:n], data.skipped)
            if data.rejects and env_rank() == 0:  # a launch's other processes read, never write
                path = self.run.rejects(name)
                write_rejects(path, data.rejects)
                log.warning(
                    "split %s: skipped %d bad row(s) (%d problem(s)); every problem is in %s",
                    name,
                    data.skipped,
                    len(data.rejects),
                    path,
                )
            self._splits[name] = data
        return self._splits[name]

    def derive(self, name: str, parents: list[str], ids: list[str]) -> None:
        """Split ``name``: the images ``ids`` of the ``parents`` splits (a cross-validation fold)."""
        self.derived[name] = (list(parents), list(ids))
        self._splits.pop(name, None)
        self._data_keys.pop(name, None)
        self._keys.clear()

    def parents(self, name: str) -> list[str]:
        """The splits whose images make up ``name`` (a fold, or ``A+B``); empty for a split of the data set."""
        if name in self.derived:
            return self.derived[name][0]
        return name.split("+") if "+" in name else []

    def add_split(self, name: str, examples: list[Example]) -> None:
        """A split that is not in the data set (images given to the Python API)."""
        self._splits[name] = SplitData(name, list(examples))
        self._data_keys.pop(name, None)
        self._keys.clear()

    def data_key(self, split: str) -> str:
        """Fingerprint of a split: the data settings and every example (caption, image size and mtime)."""
        if split not in self._data_keys:  # every downstream key needs it; the data do not change during a run
            rows = []
            for ex in self.split(split).examples:
                img = ex.image
                if isinstance(img, Path):
                    st = img.stat()
                    img = (img.name, st.st_size, st.st_mtime_ns)
                elif isinstance(img, bytes):
                    img = config_hash(img.hex())
                rows.append((ex.id, ex.caption, list(ex.concepts), ex.group, img))
            self._data_keys[split] = config_hash("data", self.cfg.data.group_column, rows)
        return self._data_keys[split]

    @property
    def stages(self) -> Registry:
        """The stages of this run's task, in order."""
        return TASKS[self.cfg.task][0]

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys([self.cfg.data.index_split, *self.cfg.data.query_splits]))

    # ------------------------------------------------------------------ artifacts
    def key(self, stage: str, *t: Any) -> str:
        """The cache key of ``stage``'s artifact for target ``t``: its settings and its inputs' keys."""
        k = (stage, *t)
        if k not in self._keys:
            st = get_stage(stage)
            inputs = [self.key(*need) for need in st.needs(self, *t)]
            self._keys[k] = config_hash(stage, st.settings(self, *t), inputs)
        return self._keys[k]

    def path(self, stage: str, *t: Any) -> Path:
        return get_stage(stage).path(self, *t)

    def fresh(self, stage: str, *t: Any) -> bool:
        return is_fresh(self.path(stage, *t), self.key(stage, *t))

    def make(self, stage: str, *t: Any) -> Path:
        """The artifact of ``stage`` for ``t``: from the cache, or made (inputs first) when the stage may run."""
        st = get_stage(stage)
        out, key = st.path(self, *t), self.key(stage, *t)
        if is_fresh(out, key) or borrow(out, key, self.peers, self.run.root):
            self.record(stage, out, False)
            return out
        if self.allowed is not None and stage not in self.allowed:
            raise StageInputError(f"{out} is missing or out of date for this config: run `{st.hint(self, *t)}` first")
        for need in st.needs(self, *t):
            self.make(*need)
        log.info("%s %s", stage, " / ".join(map(str, t)) or "")
        st.make(self, out, key, *t)
        self.record(stage, out, True)
        return out

    def record(self, stage: str, artifact: Path, ran: bool) -> None:
        self.history.append(StageRun(stage, artifact, ran))
        log.debug("%s %s: %s", stage, artifact, "done" if ran else "up to date")

    def resource(self, key: Any, build: Callable[[], Any]) -> Any:
        """An object shared by the stages of this process (an encoder, an engine), built once."""
        if key not in self._resources:
            self._resources[key] = build()
        return self._resources[key]

    def close(self) -> None:
        """Free the shared objects (engines close their models)."""
        for obj in self._resources.values():
            close = getattr(obj, "close", None)
            if callable(close):
                close()
        self._resources.clear()

    # ------------------------------------------------------------------ caption sets
    @property
    def caption_sets(self) -> list[str]:
        """Every caption set of the run, in pipeline order: generators, synthesizers, fusers."""
        return [o.name for o in (*self.cfg.generators, *self.cfg.synthesizers, *self.cfg.fusers)]

    def caption_set(self, name: str) -> CaptionSet:
        for stage, section in (("generate", self.cfg.generators), ("synthesize", self.cfg.synthesizers)):
            for o in section:
                if o.name == name:
                    return CaptionSet(name, stage, o)
        for o in self.cfg.fusers:
            if o.name == name:
                return CaptionSet(name, "fuse", o)
        raise ValueError(f"no generator, synthesizer or fuser named {name!r}; have {self.caption_sets}")

    def cfg_of(self, name: str, stage: str) -> Any:
        """The config of caption set ``name``, which ``stage`` (generate, synthesize, fuse) must make."""
        cs = self.caption_set(name)
        if cs.stage != stage:
            raise ValueError(f"{name!r} is a {cs.stage} caption set, not one that {stage} makes")
        return cs.cfg

    def generator_cfg(self, name: str) -> Any:
        return self.cfg_of(name, "generate")

    def inputs_of(self, name: str) -> list[str]:
        """The caption sets a synthesizer or fuser reads (default: every generator, and synthesizers for fusers)."""
        cs = self.caption_set(name)
        if cs.stage == "generate":
            return []
        if cs.cfg.candidates:
            return list(cs.cfg.candidates)
        names = [g.name for g in self.cfg.generators]
        return names if isinstance(cs.cfg, SynthesizerConfig) else names + [s.name for s in self.cfg.synthesizers]

    def caption_need(self, name: str, split: str) -> Need:
        return (self.caption_set(name).stage, name, split)

    def captions(self, name: str, split: str) -> dict[str, str]:
        """The captions of any caption set for a split, by image ID (made first when its stage may run)."""
        path = self.make(*self.caption_need(name, split))
        return {c.id: c.caption for c in map(Candidate.from_json, read_jsonl(path))}

    def neighbour_lists(self, split: str) -> Mapping[str, NeighbourList]:
        """Each image's neighbours, read from the retrieve stage's file when looked up (never all in memory)."""
        from medcap.retrieval.neighbour_file import NeighbourFile

        return NeighbourFile(self.make("retrieve", split))

    # ------------------------------------------------------------------ whole run
    @property
    def submit_split(self) -> str:
        queries = self.cfg.data.query_splits
        return "test" if "test" in queries else queries[-1]

    @property
    def submitted(self) -> str:
        """The caption set a run submits: ``submit.caption_set``, else the last one."""
        return self.cfg.submit.caption_set or self.caption_sets[-1]

    def plan(self, only: Iterable[str] = (), skip: Iterable[str] = ()) -> list[str]:
        """The stages a command runs, in order; unknown names fail before anything is written."""
        only, skip = list(only), list(skip)
        unknown = sorted((set(only) | set(skip)) - set(self.stages))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(self.stages)}")
        return [s for s in self.stages if (not only or s in only) and s not in skip]

    def status(self, stage: str, *t: Any) -> tuple[str, str]:
        """(cached | borrow | run | blocked, why) for one artifact, without making anything."""
        from medcap.runs import Manifest

        out, key = self.path(stage, *t), self.key(stage, *t)
        if is_fresh(out, key):
            return "cached", ""
        if any(is_fresh(Path(peer) / out.resolve().relative_to(self.run.root.resolve()), key) for peer in self.peers):
            return "borrow", "made with the same key in another run folder"
        m = Manifest.read(out)
        if m is None or not out.exists():
            why = "missing"
        elif m.key != key:
            why = "made with other settings"
        else:
            why = "unfinished: resumes where it stopped"
        if self.allowed is not None and stage not in self.allowed:
            return "blocked", f"{why}; run `{get_stage(stage).hint(self, *t)}` first"
        return "run", why

    def dry_run(self, only: Iterable[str] = (), skip: Iterable[str] = ()) -> list[tuple[str, tuple, Path, str, str]]:
        """What ``run_stages`` would do: (stage, target, artifact, status, why) in the order it would happen."""
        wanted = self.plan(only, skip)
        self.allowed = set(wanted)
        rows: list[tuple[str, tuple, Path, str, str]] = []
        seen: set[tuple] = set()

        def visit(stage: str, *t: Any) -> None:
            if (stage, *t) in seen:
                return
            seen.add((stage, *t))
            state, why = self.status(stage, *t)
            if state == "run":
                for need in get_stage(stage).needs(self, *t):
                    visit(*need)
            rows.append((stage, t, self.path(stage, *t), state, why))

        for stage in wanted:
            for t in get_stage(stage).targets(self):
                visit(stage, *t)
        return rows

    def run_stages(
        self, only: Iterable[str] = (), skip: Iterable[str] = (), allow: Iterable[str] = ()
    ) -> list[StageRun]:
        """Run the stages in order (all, or ``only`` these, minus ``skip``); returns what happened.

        Inputs of other stages are made on demand only when their stage is run or in ``allow``.
        """
        wanted = self.plan(only, skip)
        self.allowed = set(wanted) | set(allow)
        with self.session():
            for stage in wanted:
                for t in get_stage(stage).targets(self):
                    self.make(stage, *t)
        return self.history

    @contextlib.contextmanager
    def session(self, command: str | None = None) -> Iterator[Pipeline]:
        """Hold the run folder's lock while writing into it (re-entrant); log ``command`` to ``logs/run.log``;
        free shared models at the end."""
        from medcap.logs import run_log

        if self._sessions:
            self._sessions += 1
            try:
                yield self
            finally:
                self._sessions -= 1
            return
        rank0 = env_rank() == 0  # a launch's other processes neither lock nor log nor write: rank 0 does
        with (
            run_lock(self.run.root) if rank0 else contextlib.nullcontext(),
            run_log(self.run.root, command or "medcap (Python API)") if rank0 else contextlib.nullcontext(),
        ):
            self._sessions = 1
            if rank0:
                write_atomic(self.run.config(), dump_config(self.cfg))
            try:
                yield self
            finally:
                self._sessions = 0
                self.close()
