"""The answer classifier: an MLP over image and question embeddings that picks one of the training answers.

Each side is projected to ``hidden`` units; the two projections, their product (the usual bilinear
fusion of VQA models) and a closed/open flag feed a classifier over the answers of the training
questions. ``ensemble`` seeds are averaged. A model folder holds ``weights.pt`` (tensors only) and
``classifier.json`` (answers, dimensions, settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medcap.vqa.features import Split, answer_type
from medcap.vqa.normalize import normalize


class AnswerMLP(nn.Module):
    def __init__(self, d_image: int, d_text: int, hidden: int, n_answers: int, dropout: float):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(d_image, hidden), nn.GELU())
        self.text = nn.Sequential(nn.Linear(d_text, hidden), nn.GELU())
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(3 * hidden + 1, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, n_answers),
        )  # fmt: skip

    def forward(self, image: torch.Tensor, text: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
        zi, zq = self.image(image), self.text(text)
        return self.head(torch.cat([zi, zq, zi * zq, closed[:, None]], dim=1))


@dataclass
class Trained:
    answers: list[str]
    d_image: int
    d_text: int
    hidden: int
    dropout: float
    models: list[AnswerMLP]


def _closed(sp: Split, use_type: bool) -> np.ndarray:
    return np.array([answer_type(q, use_type) == "CLOSED" for q in sp.questions], dtype=np.float32)


def fit(index: Split, cfg: Any, seed: int, use_type: bool, rows: np.ndarray | None = None) -> Trained:
    """Train ``cfg.ensemble`` MLPs on the index questions (``rows`` of them, default all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster than several fighting over shared cores
    try:
        return _fit(index, cfg, seed, use_type, rows)
    finally:
        torch.set_num_threads(threads)


def _fit(index: Split, cfg: Any, seed: int, use_type: bool, rows: np.ndarray | None) -> Trained:
    rows = np.arange(len(index.questions)) if rows is None else rows
    answers_all = [normalize(index.questions[i].answer) for i in rows]
    counts: dict[str, int] = {}
    for a in answers_all:
        counts[a] = counts.get(a, 0) + 1
    answers = sorted(a for a, n in counts.items() if n >= cfg.min_count) or sorted(counts)
    col = {a: j for j, a in enumerate(answers)}
    keep = np.array([a in col for a in answers_all])
    rows = rows[keep]
    y = torch.tensor([col[normalize(index.questions[i].answer)] for i in rows])
    xi = torch.from_numpy(index.images[rows])
    xq = torch.from_numpy(index.texts[rows])
    xc = torch.from_numpy(_closed(index, use_type)[rows])
    models = []
    for m in range(max(cfg.ensemble, 1)):
        gen = torch.Generator().manual_seed(seed * 1000 + m)
        torch.manual_seed(seed * 1000 + m)
        model = AnswerMLP(xi.shape[1], xq.shape[1], cfg.hidden, len(answers), cfg.dropout)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * max(1, -(-len(y) // cfg.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(steps, 1))
        model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(len(y), generator=gen)
            for b in range(0, len(y), cfg.batch_size):
                batch = order[b : b + cfg.batch_size]
                loss = nn.functional.cross_entropy(
                    model(xi[batch], xq[batch], xc[batch]), y[batch], label_smoothing=0.1
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        models.append(model)
    return Trained(answers, xi.shape[1], xq.shape[1], cfg.hidden, cfg.dropout, models)


@torch.no_grad()
def predict(trained: Trained, query: Split, use_type: bool, top_n: int = 20) -> list[dict[str, float]]:
    """Each question's ``top_n`` answers with their mean probability over the ensemble."""
    if not query.questions:
        return []
    xi, xq = torch.from_numpy(query.images), torch.from_numpy(query.texts)
    xc = torch.from_numpy(_closed(query, use_type))
    probs = torch.stack([m(xi, xq, xc).softmax(-1) for m in trained.models]).mean(0).numpy()
    best = np.argsort(-probs, axis=1)[:, :top_n]
    return [{trained.answers[j]: float(probs[r, j]) for j in best[r]} for r in range(len(best))]


def crossfit_predict(index: Split, query: Split, cfg: Any, seed: int, use_type: bool, k: int = 5) -> list[dict]:
    """Answers for questions of the index split itself: K models by image, each answers the images it never saw."""
    from medcap.data.folds import group_folds
    from medcap.records import Example

    images = list(dict.fromkeys(q.image_id for q in query.questions))
    folds = group_folds([(Example(i, None), None) for i in images], min(k, len(images)), seed)
    out: list[dict] = [{} for _ in query.questions]
    for held in map(set, folds):
        rows = np.array([i for i, q in enumerate(index.questions) if q.image_id not in held], dtype=np.int64)
        part = [r for r, q in enumerate(query.questions) if q.image_id in held]
        sub = Split(query.name, [query.questions[r] for r in part], query.images[part], query.texts[part])
        for r, d in zip(part, predict(fit(index, cfg, seed, use_type, rows), sub, use_type), strict=True):
            out[r] = d
    return out


def save(trained: Trained, out: Path) -> None:
    from medcap.files import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    state = {f"{m}.{k}": v for m, model in enumerate(trained.models) for k, v in model.state_dict().items()}
    torch.save(state, out / "weights.pt")
    meta = {
        "answers": trained.answers, "d_image": trained.d_image, "d_text": trained.d_text, "hidden": trained.hidden,
        "dropout": trained.dropout, "ensemble": len(trained.models),
    }  # fmt: skip
    write_atomic(out / "classifier.json", json.dumps(meta))


def load(folder: Path) -> Trained:
    meta = json.loads((Path(folder) / "classifier.json").read_text())
    state = torch.load(Path(folder) / "weights.pt", weights_only=True)
    models = []
    for m in range(meta["ensemble"]):
        model = AnswerMLP(meta["d_image"], meta["d_text"], meta["hidden"], len(meta["answers"]), meta["dropout"])
        model.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(m)})
        model.eval()
        models.append(model)
    return Trained(meta["answers"], meta["d_image"], meta["d_text"], meta["hidden"], meta["dropout"], models)
