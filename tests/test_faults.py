"""Faults a GPU run meets, injected on a CPU: out of memory, an engine dying mid-run, a full disk.

The server restart of the ``openai`` engine is in ``test_openai_restart.py``.
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medcap.config import EncoderConfig, EngineConfig, GenerationConfig
from medcap.engines.base import Request
from medcap.engines.hf import HFEngine
from medcap.files import JsonlWriter, atomic_dir, read_jsonl, write_atomic
from medcap.models.oom import HalvingBatches
from medcap.records import Example
from medcap.runs import Manifest, ResumableJsonl

GREEDY = GenerationConfig(max_new_tokens=4)


class FakeOOM:
    """Wraps a model call; raises CUDA's out-of-memory error on batches larger than ``limit``, like a full GPU."""

    def __init__(self, call, limit: int, size=len):
        self.call, self.limit, self.size = call, limit, size
        self.sizes: list[int] = []

    def __call__(self, *args, **kwargs):
        n = self.size(args[0] if args else kwargs["input_ids"])
        self.sizes.append(n)
        if n > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} GiB (fake, batch of {n})")
        return self.call(*args, **kwargs)


def _oom_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]


# --------------------------------------------------------------------------- out of memory


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> str:
    from tiny_vlms import cached_tiny_vlm

    return str(cached_tiny_vlm(tmp_path_factory.getbasetemp(), "llava"))


def _requests(n: int) -> list[Request]:
    from PIL import Image

    from medcap.generators.prompts import build_messages

    messages, _ = build_messages("zero-shot", instruction="Describe the image.")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    return [Request(f"i{k}", tuple(messages), (im,), params=GREEDY) for k, im in enumerate(images)]


def _engine(model: str, batch_size: int) -> HFEngine:
    from medcap.models.families import get_family

    return HFEngine(get_family("llava"), model, EngineConfig(batch_size=batch_size))


def test_hf_engine_halves_the_batch_on_oom_and_keeps_the_smaller_size(llava, caplog):
    engine = _engine(llava, 4)
    requests = _requests(5)
    reference = engine.generate(requests)  # batches of 4 and 1, before the GPU "fills up"
    fake = FakeOOM(engine.model.generate, limit=2, size=lambda ids: ids.shape[0])
    engine.model.generate = fake  # the fake OOM comes from inside the model call
    with caplog.at_level(logging.WARNING, logger="medcap.models.oom"):
        first = engine.generate(requests)
        second = engine.generate(requests[:2])
    assert fake.sizes == [4, 2, 2, 1, 2]  # one failed batch of 4, then 2 for the rest of the run
    assert [(c.id, c.text) for c in first] == [(c.id, c.text) for c in reference]
    assert [(c.id, c.text) for c in second] == [(c.id, c.text) for c in reference[:2]]
    (warning,) = _oom_warnings(caplog)  # logged once
    assert "batch of 4; retrying with 2" in warning and "rest of the run" in warning


def test_hf_engine_gives_up_at_batch_size_one_with_a_clear_error(llava):
    engine = _engine(llava, 2)
    engine.model.generate = FakeOOM(engine.model.generate, limit=0, size=lambda ids: ids.shape[0])
    with pytest.raises(torch.OutOfMemoryError, match=r"hf engine .*llava: out of memory with a batch of 1.*max_new"):
        engine.generate(_requests(2))


def test_other_errors_are_not_taken_for_oom():
    def broken(batch):
        raise ValueError("a real bug")

    batches = HalvingBatches(8, "test")
    with pytest.raises(ValueError, match="a real bug"):
        batches.run(list(range(10)), broken)
    assert batches.size == 8
    mps = HalvingBatches(4, "test")  # other back-ends say it in a RuntimeError
    calls: list[int] = []

    def small(batch):
        calls.append(len(batch))
        if len(batch) > 1:
            raise RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)")
        return [x * 2 for x in batch]

    assert mps.run([1, 2, 3], small) == [2, 4, 6] and calls == [3, 1, 1, 1] and mps.size == 1


def test_embedder_halves_the_batch_on_oom(tmp_path, tiny_clip, caplog):
    from PIL import Image

    from medcap.retrieval.embed import embed_examples
    from medcap.retrieval.encoders import load_encoder

    cfg = EncoderConfig(name=tiny_clip, batch_size=8, device="cpu")
    rng = np.random.default_rng(0)
    examples = []
    for i in range(11):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        examples.append(Example(f"img{i}", path, f"caption {i}"))
    encoder = load_encoder(cfg)
    _, reference = embed_examples(cfg, examples, tmp_path / "ref.npy", "k", encoder=encoder)
    fake = FakeOOM(encoder.encode_pixels, limit=3)
    encoder.encode_pixels = fake
    with caplog.at_level(logging.WARNING, logger="medcap.models.oom"):
        ids, vectors = embed_examples(cfg, examples, tmp_path / "oom.npy", "k", encoder=encoder)
    assert ids == [e.id for e in examples]
    np.testing.assert_allclose(vectors.astype(np.float32), reference.astype(np.float32), atol=2e-3)
    assert fake.sizes == [8, 4, 2, 2, 2, 2, 2, 1]  # 8 fails, 4 fails, then 2 for the rest (the last batch has 3)
    assert len(_oom_warnings(caplog)) == 2


# --------------------------------------------------------------------------- an engine dying mid-run


class EngineDied(RuntimeError):
    pass


def test_engine_dying_mid_run_loses_at_most_its_chunk_and_the_rerun_resumes(
    tmp_path, phantom_dir, tiny_clip, monkeypatch
):
    from tiny_vlms import cached_tiny_vlm

    from medcap.config import load_config
    from medcap.pipeline import Pipeline

    model = str(cached_tiny_vlm(tmp_path.parent, "llava"))
    raw = {
        "name": "dies",
        "runs_dir": str(tmp_path / "runs"),
        "data": {"root": str(phantom_dir), "query_splits": ["valid"]},
        "retrieval": {"encoder": {"name": tiny_clip}, "k": 2},
        "generators": [
            {
                "name": "zs",
                "kind": "llava",
                "model": model,
                "mode": "zero-shot",
                "generation": {"max_new_tokens": 4},
                "engine": {"kind": "hf", "batch_size": 2},
            },
        ],  # fmt: skip
        "eval": {"metrics": ["rouge1"], "bootstrap": 0},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    served: list[str] = []
    real = HFEngine.generate

    def dies_on_third_call(self, requests):
        if len(served) >= 4:  # two chunks of two went through
            raise EngineDied("CUDA error: an illegal memory access was encountered")
        served.extend(r.id for r in requests)
        return real(self, requests)

    monkeypatch.setattr(HFEngine, "generate", dies_on_third_call)
    with pytest.raises(EngineDied):
        Pipeline(load_config(tmp_path / "run.yaml")).run_stages()
    out = tmp_path / "runs" / "dies" / "candidates" / "zs" / "valid.jsonl"
    kept = out.read_bytes()
    assert [r["id"] for r in read_jsonl(out)] == served  # both finished chunks are on disk, nothing else
    assert not Manifest.read(out).complete

    again: list[str] = []

    def counting(self, requests):
        again.extend(r.id for r in requests)
        return real(self, requests)

    monkeypatch.setattr(HFEngine, "generate", counting)
    history = Pipeline(load_config(tmp_path / "run.yaml")).run_stages()
    valid = [r["id"] for r in read_jsonl(tmp_path / "runs" / "dies" / "neighbours" / "valid.jsonl")]
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == sorted(valid) and len(rows) == len(valid)
    assert not set(again) & set(served) and len(again) == len(valid) - 4  # finished rows not recomputed
    assert out.read_bytes().startswith(kept) and Manifest.read(out).complete
    assert {s.stage for s in history if s.ran} >= {"generate", "evaluate", "submit"}


# --------------------------------------------------------------------------- a full disk


class FullDisk:
    """A file-like object over a real file that takes ``room`` more bytes, then fails like a full disk."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.f.flush()
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".old-" in p.name)


@pytest.fixture
def full_disk(monkeypatch):
    """After ``full_disk(*rooms)``, the n-th file medcap.files opens for writing takes ``rooms[n]`` bytes (the last
    room for every later file), then fails with ENOSPC."""
    import medcap.files as files

    def arm(*rooms: int):
        real, left = files.os.fdopen, list(rooms)

        def fdopen(fd, mode="r", *args, **kwargs):
            room = left.pop(0) if len(left) > 1 else left[0]
            return FullDisk(real(fd, mode, *args, **kwargs), room)

        monkeypatch.setattr(files.os, "fdopen", fdopen)

    return arm


def test_full_disk_during_write_atomic_keeps_the_previous_file(tmp_path, full_disk):
    path = write_atomic(tmp_path / "scores.json", '{"old": 1}')
    full_disk(5)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, '{"new": 2, "padding": "' + "x" * 1000 + '"}')
    assert path.read_text() == '{"old": 1}' and _leftovers(tmp_path) == []


def test_full_disk_during_a_2026_submission_keeps_the_previous_csv_and_zip(tmp_path, full_disk):
    from medcap.eval.submission import write_submission

    ids = [f"ImageCLEFmedical_Caption_2026_test_{i:06d}" for i in range(3)]
    zipped = write_submission({i: "old caption" for i in ids}, tmp_path / "run.csv", 2026, order=ids)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run.csv", zipped)}
    full_disk(10**6, 50)  # the CSV fits, the zip does not
    with pytest.raises(OSError, match="No space left"):
        write_submission({i: "new caption " * 30 for i in ids}, tmp_path / "run.csv", 2026, order=ids)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run.csv", zipped)} == before
    assert _leftovers(tmp_path) == []


def test_full_disk_during_a_jsonl_batch_leaves_no_torn_row(tmp_path):
    path = tmp_path / "candidates.jsonl"
    sink = ResumableJsonl(path, "generate", "key")
    sink.write([{"id": "a", "caption": "first"}, {"id": "b", "caption": "second"}])
    good = path.read_bytes()
    sink._writer._file = FullDisk(sink._writer._file, room=30)  # half of the next batch fits
    with pytest.raises(OSError, match="No space left"):
        sink.write([{"id": "c", "caption": "third " * 20}, {"id": "d", "caption": "fourth"}])
    assert path.read_bytes() == good and sink.done == {"a", "b"}
    sink.write([{"id": "c", "caption": "third"}])  # room again: the writer goes on
    sink.close()
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    assert ResumableJsonl(path, "generate", "key").done == {"a", "b", "c"}


def test_jsonl_writer_rollback_survives_its_own_failing_close(tmp_path):
    path = tmp_path / "rows.jsonl"
    writer = JsonlWriter(path)
    writer.write([{"id": "a"}])
    writer._file = FullDisk(writer._file, room=3)
    with pytest.raises(OSError):
        writer.write([{"id": "b" * 100}])
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"id": "a"}]


def test_full_disk_while_filling_an_atomic_dir_keeps_the_previous_folder(tmp_path, full_disk):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        write_atomic(tmp / "weights.bin", b"old weights")
    full_disk(4)
    with pytest.raises(OSError, match="No space left"), atomic_dir(target) as tmp:
        write_atomic(tmp / "weights.bin", b"new weights that do not fit")
    assert (target / "weights.bin").read_bytes() == b"old weights" and _leftovers(tmp_path) == []


def test_atomic_dir_puts_the_previous_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    real_rename = Path.rename

    def rename(self, dst):
        if self.name.endswith(".tmp"):  # the new folder cannot take the old one's place
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(self, dst)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text('{"new": true}')
    assert (target / "config.json").read_text() == "{}" and _leftovers(tmp_path) == []


def test_a_torn_last_row_longer_than_a_read_block_is_cut_off(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(good + b'{"id": "c", "caption": "' + b"x" * 200_000)  # a crash mid-row
    JsonlWriter(path).close()
    assert path.read_bytes() == good
    path.write_bytes(b'{"id": "only a torn row')
    JsonlWriter(path).close()
    assert path.read_bytes() == b""


def test_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, monkeypatch):
    """torch.save on a full disk fails with "unexpected pos ..."; the loop says what happened and keeps the old checkpoint."""
    import torch

    from medcap.models import training

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    first = training._save_checkpoint(tmp_path, model, opt, sched, training.LoopState(step=1), "fp")

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 968695552 vs 968695504")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"step-0000002: the checkpoint could not be written \(\d+ MB free"):
        training._save_checkpoint(tmp_path, model, opt, sched, training.LoopState(step=2), "fp")
    assert training.checkpoints(tmp_path) == [first] and (first / training.STATE).is_file()
