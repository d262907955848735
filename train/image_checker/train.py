"""The checker's training loop: BCE per category on the data step's images plus blended half-drawn objects."""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from train.data.load import Data
from train.loop import lr_schedule

from .data import blend, examples
from .model import Checker, CheckerConfig


def _batch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 4 pixels (objects appear anywhere in a scene)."""
    flip = torch.from_numpy(rng.random(len(x)) < 0.5)
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dy, dx = (int(v) for v in rng.integers(-4, 5, 2))
    return torch.roll(x, (dy, dx), (2, 3))


def scores(checker: Checker, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """unsafe_prob per image (max over categories of sigmoid(logit))."""
    checker.eval()
    with torch.no_grad():
        out = [checker(_batch(images[a:a + batch])).sigmoid().amax(1).numpy() for a in range(0, len(images), batch)]
    return np.concatenate(out)


def _examples(datas: list[Data], seed: int) -> dict[str, np.ndarray]:
    """Every folder's examples in one set; ``source`` says whose pair a blendable example is (blends stay in-folder)."""
    parts = [examples(d, seed=seed) for d in datas]
    ex = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    ex["source"] = np.concatenate([np.full(len(p["pair"]), i) for i, p in enumerate(parts)])
    return ex


def fit(datas: list[Data], config: CheckerConfig, steps: int, batch: int, lr: float, blend_share: float,
        seed: int) -> tuple[Checker, dict]:
    ex = _examples(datas, seed)
    train_idx, val_idx = np.flatnonzero(~ex["val"]), np.flatnonzero(ex["val"])
    blendable = np.flatnonzero((ex["pair"] >= 0) & ~ex["val"])
    rng = np.random.default_rng(seed)
    checker = Checker(config)
    opt = torch.optim.AdamW(checker.parameters(), lr=lr, weight_decay=1e-2)
    sched = lr_schedule(opt, steps, warmup=min(100, steps // 10))
    n_blend = int(round(batch * blend_share)) if len(blendable) else 0
    log = []
    for step in tqdm(range(steps), desc="image checker", mininterval=2.0):
        checker.train()
        i = rng.choice(train_idx, batch - n_blend)
        x, y = ex["image"][i], ex["target"][i]
        if n_blend:
            b = rng.choice(blendable, n_blend)
            for k, data in enumerate(datas):
                bk = b[ex["source"][b] == k]
                if len(bk):
                    bx, by = blend(data, ex["pair"][bk], ex["target"][bk], rng)
                    x, y = np.concatenate([x, bx]), np.concatenate([y, by])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(checker(_augment(_batch(x), rng)), torch.from_numpy(y))
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 5)})
    s = scores(checker, ex["image"][val_idx])
    pos = ex["target"][val_idx].max(1) > 0.5
    metrics = {"val_positives": int(pos.sum()), "val_negatives": int((~pos).sum()),
               "val_recall@0.5": round(float((s[pos] >= 0.5).mean()), 4) if pos.any() else None,
               "val_false_positive@0.5": round(float((s[~pos] >= 0.5).mean()), 4),
               "train_examples": int(len(train_idx)), "log": log}
    return checker, metrics
