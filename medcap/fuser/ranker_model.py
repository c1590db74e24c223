"""The ranker's model: a small network over each hypothesis's features, trained listwise in the one loop.

Per image, the network scores every hypothesis of its list; the loss is the cross-entropy between the
softmax of those scores and the softmax of the hypotheses' utilities against the reference at a
temperature (ListNet): the model learns which hypothesis of an image's pool fits it best, relative to
the others, not an absolute utility. Features are standardised with the training set's mean and
spread (kept in the model). Training runs in ``models/training.py`` (seeded batches of images,
AdamW, checkpoints, exact resume); the model is ``model.safetensors`` + ``ranker.json``.

:func:`select_and_fit` is the nested choice: inner case-grouped folds of the training images pick the
settings (hidden width, temperature) by the mean utility of the hypothesis each setting would choose
on the held-out inner fold; the chosen one is refitted on every training image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medcap.config import TrainConfig
from medcap.files import write_json
from medcap.models import training
from medcap.models.distributed import world

log = logging.getLogger(__name__)

FINAL = "final"
META = "ranker.json"


@dataclass
class ListData:
    """The training lists: per image, its hypotheses' features (n_i, F) and utilities (n_i,)."""

    ids: list[str]
    groups: list[str]
    features: list[np.ndarray]
    utility: list[np.ndarray]
    rows: list[np.ndarray]  # the hypotheses' pool rows (-1: a candidate outside the pool)
    bs: list[np.ndarray]  # BERTScore and ROUGE-1 against the reference, the utility's parts
    r1: list[np.ndarray]
    texts: list[np.ndarray]  # the hypotheses' raw text

    FIELDS = ("ids", "groups", "features", "utility", "rows", "bs", "r1", "texts")

    def subset(self, keep: list[int]) -> ListData:
        return ListData(*([getattr(self, f)[k] for k in keep] for f in self.FIELDS))

    def save(self, path: Path) -> None:
        import io

        buf = io.BytesIO()
        lengths = np.array([len(u) for u in self.utility], dtype=np.int64)
        np.savez(buf, ids=np.array(self.ids), groups=np.array(self.groups), lengths=lengths,
                 features=np.concatenate(self.features), utility=np.concatenate(self.utility),
                 rows=np.concatenate(self.rows), bs=np.concatenate(self.bs), r1=np.concatenate(self.r1),
                 texts=np.concatenate(self.texts))  # fmt: skip
        from medcap.files import write_atomic

        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> ListData:
        with np.load(path) as z:
            cuts = np.cumsum(z["lengths"])[:-1]
            split = lambda k: np.split(z[k], cuts)  # noqa: E731
            return cls(list(map(str, z["ids"])), list(map(str, z["groups"])), split("features"), split("utility"),
                       split("rows"), split("bs"), split("r1"), [t.astype(str) for t in split("texts")])  # fmt: skip


def build_net(n_features: int, hidden: int, mean: np.ndarray, std: np.ndarray) -> Any:
    import torch
    from torch import nn

    class RankerNet(nn.Module):
        """Standardised features -> a linear score (``hidden`` 0) or a one-hidden-layer MLP's."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            layers = [nn.Linear(n_features, 1)] if hidden == 0 else [
                nn.Linear(n_features, hidden), nn.GELU(), nn.Linear(hidden, 1)
            ]  # fmt: skip
            self.net = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net((x - self.mean) / self.std).squeeze(-1)

    return RankerNet()


def _pad(lists: list[np.ndarray], fill: float) -> np.ndarray:
    width = max(len(x) for x in lists)
    shape = (len(lists), width, *lists[0].shape[1:])
    out = np.full(shape, fill, dtype=np.float32)
    for k, x in enumerate(lists):
        out[k, : len(x)] = x
    return out


def listwise_loss(net: Any, batch: tuple[Any, Any, Any], temperature: float) -> Any:
    """Summed over the batch's images: cross-entropy of softmax(scores) against softmax(utility / temperature)."""
    import torch

    x, u, mask = batch
    scores = net(x).masked_fill(~mask, -1e9)
    target = torch.softmax((u / temperature).masked_fill(~mask, -1e9), dim=1)
    return -(target * torch.log_softmax(scores, dim=1)).sum()


def fit(data: ListData, hidden: int, temperature: float, tc: TrainConfig, out_dir: Path, name: str) -> Any:
    """Train one network on ``data`` into ``out_dir`` (checkpoints, exact resume); returns the trained network."""
    import torch

    feats = np.concatenate(data.features)
    mean, std = feats.mean(axis=0), feats.std(axis=0) + 1e-6
    training.seed_everything(tc.seed)
    net = build_net(feats.shape[1], hidden, mean, std)

    def batch(idx: list[int], m: int) -> tuple[Any, Any, Any]:
        x = torch.from_numpy(_pad([data.features[i] for i in idx], 0.0))
        u = torch.from_numpy(_pad([data.utility[i] for i in idx], 0.0))
        mask = torch.from_numpy(_pad([np.ones(len(data.utility[i])) for i in idx], 0.0) > 0)
        return x, u, mask

    def save(folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
        meta = {"n_features": int(feats.shape[1]), "hidden": hidden, "temperature": temperature}
        (folder / META).write_text(json.dumps(meta, indent=2))

    fingerprint = json.dumps(
        {"hidden": hidden, "temperature": temperature, "train": training_settings(tc), "ids": data.ids}, sort_keys=True
    )

    def load(folder: Path) -> None:  # a fit finished before (a rerun): its checkpoints are gone, its model is here
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(folder / "model.safetensors")))

    recipe = training.Recipe(
        model=net, n=len(data.ids), batch=batch, loss=lambda b: listwise_loss(net, b, temperature),
        tokens=lambda b: int(b[0].shape[0]), save=save, fingerprint=fingerprint, name=name, load=load,
    )  # fmt: skip
    training.fit(recipe, tc, out_dir, FINAL)
    net.eval()
    return net


def training_settings(tc: TrainConfig) -> dict[str, Any]:
    from medcap.keys import key_settings

    return key_settings(tc)


def orders(net: Any, features: list[np.ndarray]) -> list[np.ndarray]:
    """Per image, its hypotheses from the network's best to its worst (ties: the list's order)."""
    import torch

    with torch.inference_mode():
        scores = [net(torch.from_numpy(f.astype(np.float32))).numpy() for f in features]
    return [np.argsort(-s, kind="stable") for s in scores]


def choose(net: Any, features: list[np.ndarray]) -> list[int]:
    """The index of the hypothesis the network scores highest, per image."""
    return [int(o[0]) for o in orders(net, features)]


def load_net(folder: Path) -> Any:
    from safetensors.torch import load_file

    meta = json.loads((Path(folder) / META).read_text())
    state = load_file(str(Path(folder) / "model.safetensors"))
    net = build_net(meta["n_features"], meta["hidden"], state["mean"].numpy(), state["std"].numpy())
    net.load_state_dict(state)
    net.eval()
    return net


def select_and_fit(
    data: ListData, grid: list[tuple[int, float]], folds: int, tc: TrainConfig, out_dir: Path, seed: int, name: str
) -> tuple[Any, dict[str, Any], dict[int, tuple[int, np.ndarray]]]:
    """Nested choice: inner case-grouped folds pick (hidden, temperature); the choice is refitted on all of ``data``.

    Also returns the chosen setting's out-of-fold orders: image position -> (inner fold, its hypotheses
    best first, by the model that did not learn from it).
    """
    from medcap.data.folds import group_folds
    from medcap.records import Example

    table: list[dict[str, Any]] = []
    oof: dict[tuple[int, float], dict[int, tuple[int, np.ndarray]]] = {}
    if folds >= 2:
        items = [(Example(i, None, group=g), None) for i, g in zip(data.ids, data.groups, strict=True)]
        cut = group_folds(items, folds, seed)
        pos = {i: k for k, i in enumerate(data.ids)}
        for hidden, temperature in grid:
            chosen = []
            for f, held in enumerate(cut):
                held_set = set(held)
                train = data.subset([k for k, i in enumerate(data.ids) if i not in held_set])
                test = [pos[i] for i in held]
                net = fit(train, hidden, temperature, tc, out_dir / "inner" / f"h{hidden}-t{temperature}-f{f}", name)
                ranked = orders(net, [data.features[k] for k in test])
                oof.setdefault((hidden, temperature), {}).update({k: (f, o) for k, o in zip(test, ranked, strict=True)})
                chosen += [float(data.utility[k][o[0]]) for k, o in zip(test, ranked, strict=True)]
            table.append({"hidden": hidden, "temperature": temperature, "utility": float(np.mean(chosen))})
            log.info(
                "%s: inner CV hidden %d, temperature %g: utility %.4f", name, hidden, temperature, table[-1]["utility"]
            )
        best = max(table, key=lambda r: r["utility"])
        hidden, temperature = best["hidden"], best["temperature"]
    else:
        hidden, temperature = grid[0]
    net = fit(data, hidden, temperature, replace(tc), out_dir, name)
    report = {"hidden": hidden, "temperature": temperature, "inner_cv": table, "images": len(data.ids)}
    if world().is_main:  # under a launcher every process fits, rank 0 writes
        write_json(out_dir / FINAL / "selection.json", report)
    return net, report, oof.get((hidden, temperature), {})
