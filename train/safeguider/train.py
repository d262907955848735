"""The published SafeGuider recipe in one accelerate loop: SGD lr 1e-3, momentum 0.9, batch 32, 50 epochs, CE.

Runs single-process or under ``accelerate launch`` (the data loader is sharded, gradients are all-reduced);
the main process writes a checkpoint every epoch (``<out>/checkpoint.pt``; ``resume=True`` continues from it),
validation accuracy per epoch, and at the end ``config.json`` + ``model.safetensors`` + ``train_log.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from guards.safeguider import SafeGuiderClassifier, SafeGuiderConfig
from train.loop import resume as resume_from, save_checkpoint


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy (argmax = published decision, i.e. safe iff P(safe) > 0.5) overall and per class, and CE."""
    if len(y) == 0:
        return {}
    model.eval()
    logits, probs = model(x)
    pred = probs.argmax(dim=1)
    out = {"n": len(y), "accuracy": (pred == y).float().mean().item(),
           "loss": torch.nn.functional.cross_entropy(logits, y).item()}
    for label, name in ((0, "unsafe"), (1, "safe")):
        m = y == label
        if m.any():
            out[f"accuracy_{name}"] = (pred[m] == label).float().mean().item()
    return out


def fit(accelerator, train_x, train_y, val_x, val_y, out: Path, *, epochs: int = 50, batch_size: int = 32,
        lr: float = 1e-3, momentum: float = 0.9, seed: int = 0, resume: bool = False, meta: dict | None = None,
        checks: dict | None = None, encoder_widths: list[int] | None = None, search: dict | None = None) -> dict:
    """``accelerator``: from :func:`train.loop.setup` (which seeded the process before the model is made).
    ``checks``: more held-out sets ``{name: (x, y)}``, evaluated once at the end into the log.
    ``encoder_widths``: SDXL, the per-encoder split of the concatenated EOS features (the config records it).
    ``search``: search settings other than the defaults (e.g. ``min_similarity``), recorded in ``config.json``."""
    out = Path(out)
    ckpt = out / "checkpoint.pt"
    model = SafeGuiderClassifier(SafeGuiderConfig(hidden_size=train_x.shape[1], encoder_widths=encoder_widths,
                                                  **(search or {})))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    start, history, _ = resume_from(ckpt, model, optimizer) if resume else (0, [], {})
    if start:
        accelerator.print(f"resumed from {ckpt} after epoch {start}")
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    criterion = torch.nn.CrossEntropyLoss()

    t0 = time.perf_counter()
    bar = tqdm(range(start, epochs), desc="safeguider", disable=not accelerator.is_local_main_process)
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for x, y in loader:
            logits, _ = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
        val = evaluate(accelerator.unwrap_model(model), val_x, val_y)
        history.append({"epoch": epoch + 1, "train_loss": total / max(count, 1), **{f"val_{k}": v for k, v in val.items()}})
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}", val_acc=f"{val.get('accuracy', float('nan')):.4f}")
        if accelerator.is_main_process:
            save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, epoch + 1, history)
        accelerator.wait_for_everyone()

    model = accelerator.unwrap_model(model)
    log = {"recipe": {"optimizer": "SGD", "lr": lr, "momentum": momentum, "batch_size": batch_size,
                      "epochs": epochs, "loss": "cross_entropy", "processes": accelerator.num_processes},
           **(meta or {}), "seconds": round(time.perf_counter() - t0, 2),
           "train": evaluate(model, train_x, train_y), "val": evaluate(model, val_x, val_y),
           **{name: evaluate(model, x, y) for name, (x, y) in (checks or {}).items()}, "history": history}
    if accelerator.is_main_process:
        model.save_pretrained(out)
        (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return log
