"""Training mechanics every guard trainer shares, written once: process setup (accelerator, threads, seed), the
warm-up + cosine learning-rate schedule, and atomic checkpoints that ``--resume`` continues from."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from guards.storage import atomic_path


def seed_everything(seed: int, threads: int | None = None) -> None:
    """Seed python, numpy and torch (accelerate's ``set_seed``); ``threads``: torch intra-op threads."""
    from accelerate.utils import set_seed

    if threads is not None:
        torch.set_num_threads(threads)
    set_seed(seed)


def setup(seed: int, threads: int | None = None, **accelerator_kwargs: Any):
    """Threads and seed (:func:`seed_everything`), then the ``Accelerator``. Without CUDA it is a CPU one, so
    processes started by ``accelerate launch --multi_gpu`` / torchrun join as MULTI_CPU with gloo."""
    from accelerate import Accelerator

    seed_everything(seed, threads)
    return Accelerator(cpu=not torch.cuda.is_available(), **accelerator_kwargs)


def warmup_cosine(step: int, total: int, warmup: int = 0) -> float:
    """LR factor at ``step`` (0-based): linear warm-up over ``warmup`` steps to 1, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def lr_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine` on every param group; call ``.step()`` after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup))


def save_checkpoint(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    log: list, scheduler=None, **extra: Any) -> None:
    """What :func:`resume` needs to continue after ``step`` steps, written atomically (temp file, rename).
    ``module``: the (unwrapped) module being trained; ``extra``: anything else the trainer wants back."""
    state = {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": torch.get_rng_state(), "extra": extra}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def resume(path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
           scheduler=None) -> tuple[int, list, dict]:
    """Load the checkpoint at ``path`` into ``module`` / ``optimizer`` / ``scheduler`` and the torch RNG;
    returns ``(step, log, extra)``, or ``(0, [], {})`` when there is none."""
    path = Path(path)
    if not path.is_file():
        return 0, [], {}
    state = torch.load(path, weights_only=False)
    if not isinstance(state, dict) or not {"model", "optimizer", "step", "log", "rng"} <= set(state):
        raise ValueError(f"{path}: not a checkpoint written by train/loop.py (an older trainer's?): delete it, or "
                         f"train without --resume")
    module.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], state["log"], state["extra"]
