"""Checkpoints are data, never code; a finished training keeps its model and report, not its checkpoints."""

import os
import pickle

import numpy as np
import pytest
import torch
from ddp_worker import config, recipe, train, weights

from medcap.models import checkpoints, training


class Planted:
    """What someone with write access to a shared run folder could leave: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_refuses_a_checkpoint_whose_pickle_would_run_code(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    train(run, stop_after=2)
    (state,) = (run / "checkpoints").glob("step-*/state.pt")
    blob = torch.load(state, weights_only=True)
    blob["state"]["history"].append(Planted(marker))
    torch.save(blob, state)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=r"state\.pt: refusing to resume.*posix\.system") as e:
        train(run)
    assert "can run any code" in str(e.value) and f"Delete {run / 'checkpoints'}" in str(e.value)
    assert not marker.exists()
    with open(state, "wb") as f:  # a plain pickle, not torch's zip format, is refused the same way
        pickle.dump(Planted(marker), f, protocol=2)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match="refusing to resume"):
        train(run)
    assert not marker.exists()


def test_a_checkpoint_of_the_old_format_is_refused_with_what_to_do(tmp_path):
    run = tmp_path / "run"
    train(run, stop_after=2)
    (state,) = (run / "checkpoints").glob("step-*/state.pt")
    blob = torch.load(state, weights_only=True)
    blob["rng"]["numpy"] = np.random.get_state()  # medcap before safe checkpoints pickled NumPy's RNG state
    del blob["format"]
    torch.save(blob, state)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=r"numpy\S*_reconstruct.*older medcap.*Delete"):
        train(run)
    blob["rng"]["numpy"], blob["format"] = {}, 1  # plain data, but not what this medcap writes
    torch.save(blob, state)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=r"another format \(1, expected 2\)"):
        train(run)


def test_a_checkpoint_holds_only_plain_data_and_resumes_exactly(tmp_path):
    whole, _ = train(tmp_path / "whole")
    run = tmp_path / "run"
    train(run, stop_after=3)
    (path,) = checkpoints.checkpoints(run)[-1:]
    saved = checkpoints.read(path)  # weights_only=True
    assert saved["format"] == checkpoints.FORMAT and saved["state"]["step"] == 3
    assert isinstance(saved["rng"]["numpy"]["keys"], torch.Tensor)
    final, _ = train(run)
    assert all(torch.equal(a, b) for a, b in zip(weights(whole).values(), weights(final).values(), strict=True))
    with pytest.raises(TypeError, match=r"checkpoint\.x\.0: a set is not plain data"):
        checkpoints.plain({"x": [{1}]})
    assert checkpoints.plain({"v": np.float64(0.5), "t": (1, np.int64(2))}) == {"v": 0.5, "t": (1, 2)}


def test_a_finished_training_keeps_its_model_and_drops_its_checkpoints(tmp_path):
    final, state = train(tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "best").exists()
    assert (final / "weights.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors writes 0600
    r = recipe()
    again, same = training.fit(r, config(), tmp_path / "run", "final")  # finished: not trained again, read back
    assert again == final and same.step == state.step == 6
    assert all(torch.equal(v, weights(final)[k]) for k, v in r.model.state_dict().items())
    kept, _ = train(tmp_path / "kept", config(keep_checkpoints=True))
    assert [p.name for p in checkpoints.checkpoints(tmp_path / "kept")] == ["step-0000004", "step-0000006"]
    training.reset(tmp_path / "run", "final")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []
