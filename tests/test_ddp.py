"""Data-parallel training: two CPU processes (torchrun, gloo) train like one, survive a killed rank, resume across N."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ddp_worker import config, train, weights

from medcap.launch import command, free_port, launcher_for
from medcap.models import checkpoints, training
from medcap.models.distributed import World, lone_cpu_launch
from medcap.models.schedule import log_plan
from medcap.runs import LOCK_HELD

TESTS = Path(__file__).resolve().parent


def torchrun(out: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``tests/ddp_worker.py OUT ARGS`` in ``processes`` processes on this machine's CPUs."""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    cmd += ["--master_port", str(free_port()), str(TESTS / "ddp_worker.py"), str(out), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def assert_same_weights(a: Path, b: Path, tol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= tol, f"weights differ by {worst}"


def test_two_processes_end_with_the_weights_of_one(tmp_path):
    """The same global batch (batch_size 3 x grad_accum 4): 2 processes take 2 micro-batches each."""
    one, _ = train(tmp_path / "one")
    res = torchrun(tmp_path / "two")
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_weights(one, tmp_path / "two" / "final")
    assert "global batch 12 = batch_size 3 x 2 micro-batch(es) per process x 2 process(es)" in res.stderr
    # rank 0 wrote one model, one record and the history; the checkpoints went once it was written
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["final", "history.jsonl", "training.json"]
    assert (tmp_path / "two" / "history.jsonl").read_text().count("val_loss") == 2


def test_a_killed_rank_leaves_a_usable_checkpoint_and_the_rerun_finishes(tmp_path, caplog):
    whole, _ = train(tmp_path / "whole")
    run = tmp_path / "run"
    res = torchrun(run, "--exit-after", "4")  # rank 1 dies after step 4's checkpoint
    assert res.returncode != 0 and not (run / "final").exists()
    last = checkpoints.checkpoints(run)[-1]
    assert last.name == "step-0000004"
    assert checkpoints.read(last)["state"]["step"] == 4  # loads with weights_only=True
    shutil.copytree(run, tmp_path / "copy")

    res = torchrun(run)  # the same N
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming at step 4 of 6" in res.stderr
    assert_same_weights(whole, run / "final")

    with caplog.at_level(logging.INFO, logger="medcap.models.training"):  # another N: one process
        final, state = train(tmp_path / "copy")
    assert "written by 2 process(es), this run has 1" in caplog.text
    assert state.step == 6 and state.examples == 6 * 12 and state.processes == 1
    assert_same_weights(whole, final)


def test_a_pause_in_one_process_resumes_in_two_with_gradient_checkpointing(tmp_path):
    """Gradient checkpointing (reentrant, as QLoRA turns it on) recomputes the forward pass, dropout included."""
    whole, _ = train(tmp_path / "whole")
    run = tmp_path / "run"
    _, state = train(run, stop_after=2)
    assert state.step == 2 and not (run / "final").exists()
    res = torchrun(run, "--checkpointing")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "written by 1 process(es), this run has 2" in res.stderr
    assert_same_weights(whole, run / "final")


def test_the_shard_of_each_process_and_idle_processes(caplog):
    plan = training.Plan(n=10, batch_size=3, seed=0)
    assert [plan.shard(4, 4, World(rank=r, size=2)) for r in (0, 1)] == [[4, 6], [5, 7]]
    assert [plan.shard(0, 3, World(rank=r, size=2)) for r in (0, 1)] == [[0, 2], [1]]
    assert [plan.size(m) for m in range(5)] == [3, 3, 3, 1, 3]  # the last of an epoch is short
    recipe = type("R", (), {"name": "r", "n": 10})()
    with caplog.at_level(logging.INFO, logger="medcap.models.training"):
        log_plan(recipe, config(grad_accum=1), plan, 6, World(rank=0, size=2))
    assert "1 of them idle" in caplog.text


def test_who_launches_and_how(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "ACCELERATE_USE_CPU", LOCK_HELD):
        monkeypatch.delenv(name, raising=False)
    tc = config()
    assert launcher_for(tc, None) is None
    tc.processes = 2
    assert launcher_for(tc, None) == "accelerate" and launcher_for(tc, "torchrun") == "torchrun"
    cmd = command("accelerate", 2, ["train", "generator", "g", "-c", "c.yaml"], 1234)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[-7:] == ["-m", "medcap", "train", "generator", "g", "-c", "c.yaml"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"  # accelerate's --cpu starts one
    assert command("torchrun", 2, ["x"], 1234)[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launcher_for(tc, "accelerate") is None  # already launched: train here
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv(LOCK_HELD, "/runs/x")
    assert launcher_for(tc, "accelerate") is None  # launched by medcap, even as a launch's only process
    monkeypatch.delenv(LOCK_HELD)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert lone_cpu_launch()  # accelerate launch --num_processes 2 --cpu: one process, said so
