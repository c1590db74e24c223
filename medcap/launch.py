"""Training stages in several processes: handing a training to ``accelerate launch`` / ``torchrun``, and
running a ``medcap train`` command as one of the processes a launcher started.

Every stage of ``medcap run`` runs in its own process. A training whose ``train.processes`` is
above 1, or every training when ``medcap run --launcher`` names a launcher, is handed over
instead (:func:`hand_off`): the resolved config goes to ``logs/launch-STAGE-NAME.yaml``, medcap starts
``accelerate launch ... -m medcap train generator NAME -c THAT_CONFIG`` and waits. The command
that launched keeps holding the run's lock; the launched processes find it held for them
(``MEDCAP_RUN_LOCK_HELD``) and do not take it. Inside them (:func:`make_trained`) rank 0 makes
any missing input while the others wait, every process trains, and rank 0 alone writes the model
and its manifest. The training's key leaves the number of processes out: the global batch does
not depend on it (``models/training.py``), so a model trained in 2 processes is the one a
1-process run would use.
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.config import TrainConfig, dump_config
from medcap.files import write_atomic
from medcap.models.distributed import launched, lone_cpu_launch, world
from medcap.runs import LOCK_HELD, is_fresh, safe_name

if TYPE_CHECKING:
    from medcap.pipeline import Pipeline

log = logging.getLogger(__name__)

LAUNCHERS = ("accelerate", "torchrun")


class LaunchError(RuntimeError):
    """A training handed to a launcher failed, or left no model with the key expected of it."""


def launcher_for(tc: TrainConfig | None, launcher: str | None) -> str | None:
    """The launcher a training goes to (None: train in this process)."""
    if launched() or LOCK_HELD in os.environ or tc is None:
        return None  # already one of a launcher's processes (even the only one it started)
    if launcher is not None and launcher not in LAUNCHERS:
        raise ValueError(f"launcher {launcher!r}: use one of {LAUNCHERS}")
    return launcher or ("accelerate" if tc.processes > 1 else None)


def free_port() -> int:
    """A TCP port nobody listens on now: the rendezvous of one launch (two trainings at once must not share 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, processes: int, argv: list[str], port: int) -> list[str]:
    """The launcher's command line that runs ``medcap ARGV`` in ``processes`` processes on this machine.

    accelerate starts several CPU processes only through mpirun (its ``--cpu`` runs one), so
    ``--multi_gpu`` asks for its torchrun launcher on CPUs too: medcap picks gloo there. With
    ``processes`` 1 accelerate's own config (``accelerate config``) says how many.
    """
    import torch

    gpus = torch.cuda.device_count()
    if processes > 1 and 0 < gpus < processes:
        raise ValueError(f"train.processes {processes}: this machine has {gpus} GPU(s), one per process")
    if launcher == "torchrun":
        n = processes if processes > 1 else max(gpus, 1)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
                "-m", "medcap", *argv]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(port)]
    if processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    return [*cmd, "-m", "medcap", *argv]


def hand_off(pipe: Pipeline, stage: str, name: str, tc: Any, launcher: str, out: Path, key: str) -> None:
    """Run training ``stage`` of ``name`` under ``launcher`` and wait; it must leave ``out`` fresh with ``key``."""
    if pipe.derived:
        raise ValueError(
            f"{stage} {name}: a training on a derived split (a cross-validation fold) cannot be handed to a launcher; "
            "set train.processes: 1 for it"
        )
    group = {"train": "generator", "train-fuser": "fuser"}[stage]
    config = pipe.run.root / "logs" / f"launch-{stage}-{safe_name(name)}.yaml"
    write_atomic(config, dump_config(pipe.cfg))
    cmd = command(launcher, tc.processes, ["train", group, name, "-c", str(config)], free_port())
    env = dict(os.environ, **{LOCK_HELD: str(pipe.run.root.resolve())})
    log.info("%s %s: handed to %s: %s", stage, name, launcher, shlex.join(cmd))
    pipe.close()  # the models this process holds (an encoder on the GPU rank 0 trains on) go first
    rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc != 0:
        raise LaunchError(
            f"{stage} {name}: the launched training failed (exit {rc}); its log is in {pipe.run.root}/logs/run.log, "
            f"and a rerun resumes from its last checkpoint. The command: {shlex.join(cmd)}"
        )
    if not is_fresh(out, key):
        raise LaunchError(f"{stage} {name}: the launched training did not leave {out} finished with this run's key")


def make_trained(pipe: Pipeline, stage: str, *target: Any) -> Path:
    """``pipe.make(stage, *target)`` in each process of a launch: rank 0 makes missing inputs first.

    In a single process it is ``pipe.make``.
    """
    from medcap.pipeline import get_stage

    if lone_cpu_launch():
        log.warning(
            "accelerate launch --cpu started one process (accelerate starts several CPU processes only through "
            "mpirun); training in this one. For N CPU processes: accelerate launch --multi_gpu --num_processes N "
            "-m medcap ..., or torchrun --nproc_per_node N -m medcap ..."
        )
    w = world()
    if w.size > 1:
        if w.is_main:
            for need in get_stage(stage).needs(pipe, *target):
                pipe.make(*need)
        w.barrier()
    return pipe.make(stage, *target)
