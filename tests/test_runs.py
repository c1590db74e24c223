"""Run directory plumbing: atomic writes, torn JSONL lines, manifests and resumable artifacts."""

import json

import pytest

from medcap.files import JsonlWriter, read_jsonl, write_atomic
from medcap.runs import Manifest, ResumableJsonl, RunDir, is_fresh, manifest_path, safe_name


def test_write_atomic_leaves_no_temp_files(tmp_path):
    path = write_atomic(tmp_path / "a" / "b.txt", "hello")
    assert path.read_text() == "hello"
    write_atomic(path, b"bytes")
    assert path.read_bytes() == b"bytes"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


def test_write_atomic_keeps_old_file_when_writing_fails(tmp_path):
    path = write_atomic(tmp_path / "x.txt", "old")

    with pytest.raises(TypeError):
        write_atomic(path, object())  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_torn_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "capt')
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    with JsonlWriter(path) as w:
        w.write([{"id": "d"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "d"]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_resumable_jsonl_resumes_with_same_key_and_restarts_with_another(tmp_path):
    path = tmp_path / "cands.jsonl"
    sink = ResumableJsonl(path, "generate", "k1")
    sink.write([{"id": "a"}, {"id": "b"}])
    sink.close()  # crash before finish()
    assert not is_fresh(path, "k1")
    assert Manifest.read(path).complete is False

    again = ResumableJsonl(path, "generate", "k1")
    assert again.done == {"a", "b"}
    again.write([{"id": "c"}])
    again.finish()
    assert is_fresh(path, "k1") and not is_fresh(path, "k2")
    assert Manifest.read(path).count == 3
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]

    fresh = ResumableJsonl(path, "generate", "k2")
    assert fresh.done == set()
    fresh.finish()
    assert read_jsonl(path) == []


def test_manifest_roundtrip_and_unreadable_manifest(tmp_path):
    art = tmp_path / "x.npy"
    art.write_bytes(b"1")
    Manifest("embed", "abc", complete=True, inputs=("y",), count=3).write(art)
    m = Manifest.read(art)
    assert (m.stage, m.key, m.complete, m.inputs, m.count) == ("embed", "abc", True, ("y",), 3)
    assert json.loads(manifest_path(art).read_text())["medcap_version"]
    manifest_path(art).write_text("{broken")
    assert Manifest.read(art) is None and not is_fresh(art, "abc")


def test_run_dir_layout(tmp_path):
    run = RunDir(tmp_path)
    assert run.embeddings("local-dir:/a/b", "train") == tmp_path / "embeddings" / "local-dir__a_b" / "train.npy"
    assert run.candidates("nearest", "valid") == tmp_path / "candidates" / "nearest" / "valid.jsonl"
    assert run.neighbours("valid").name == "valid.jsonl"
    assert safe_name("..") == "unnamed"


def test_run_lock_refuses_a_second_process_on_the_same_run(tmp_path):
    from medcap.runs import RunLockedError, run_lock

    with (
        run_lock(tmp_path / "run"),
        pytest.raises(RunLockedError, match="in use by another medcap process"),
        run_lock(tmp_path / "run"),
    ):
        pass
    with run_lock(tmp_path / "run"):  # released
        pass


def test_atomic_dir_replaces_whole_or_leaves_the_old_folder(tmp_path):
    from medcap.files import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_artifacts_get_the_mode_open_would_give_them(tmp_path):
    import os

    from medcap.files import atomic_dir

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.html", "<html/>")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"x")
        assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)  # a private umask is honoured
        write_atomic(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
