"""The SafePatch training loops (accelerate): the prompt gate (CE), then the patch (differential supervision).

Patch loss, per example (z_0 = the TARGET image's latent, eps ~ N(0, I), t uniform, z_t = add_noise):

    L = || eps - UNet(z_t, t, c_prompt, residuals = S(z_t, t, c_prompt, s_instruction)) ||^2

which equals || eps - eps_base(z_t,t,c_u) - S_eff ||^2 with S_eff the patch's effect on the frozen UNet's
output (a v-prediction backbone: the target is v = sqrt(a_t) eps - sqrt(1 - a_t) z_0 instead of eps). For
unsafe triplets the target is the SAFE image, so the patch learns to remove what the instruction names; for
benign pairs the target is the prompt's own image, so it learns to stay silent.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from guards.safepatch import SafePatchConfig
from train.loop import lr_schedule, resume as resume_from, save_checkpoint, setup


def fit_gate(gate, train: tuple, val: tuple, *, steps: int = 600, batch_size: int = 128, lr: float = 1e-3,
             threshold: float = SafePatchConfig.threshold, seed: int = 0) -> dict:
    """Minibatch AdamW CE on (hidden, eos, label) of the gate prompts (seconds); train/val metrics."""
    (h, e, y), (vh, ve, vy) = train, val
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(gate.parameters(), lr=lr, weight_decay=1e-2)
    gate.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(gate.logits(h[idx], e[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    gate.eval()
    with torch.no_grad():
        acc = lambda a, b, c: _mean(gate.logits(a, b).argmax(-1) == c)  # noqa: E731
        pv = torch.softmax(gate.logits(vh, ve), -1)
        fire = (1 - pv[:, 0]) >= threshold
        score = 1 - pv[:, 0]
        table = {f"{t:.2f}": {"benign_fire": _mean(score[vy == 0] >= t), "unsafe_fire": _mean(score[vy > 0] >= t)}
                 for t in THRESHOLDS}
        return {"loss": float(loss), "train_accuracy": acc(h, e, y), "val_accuracy": acc(vh, ve, vy),
                "val_prompts": len(vy), "val_benign_fire_rate": _mean(fire[vy == 0]),
                "val_unsafe_fire_rate": _mean(fire[vy > 0]),
                "val_min_unsafe_score": float(score[vy > 0].min()) if bool((vy > 0).any()) else None,
                "val_thresholds": table}


def _mean(x: torch.Tensor) -> float | None:
    """Share of True in ``x``; None when empty (a small data folder's validation share may lack a class)."""
    return float(x.float().mean()) if x.numel() else None


THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def pick_threshold(gate_log: dict, min_unsafe_fire: float = 0.995) -> float:
    """The largest threshold of THRESHOLDS that still fires on >= ``min_unsafe_fire`` of the held-back unsafe
    prompts (fewest benign false fires, so most benign images stay bit-identical). No held-back unsafe prompt
    (a tiny data folder): the smallest."""
    ok = [t for t in THRESHOLDS if (gate_log["val_thresholds"][f"{t:.2f}"]["unsafe_fire"] or 0) >= min_unsafe_fire]
    return max(ok) if ok else min(THRESHOLDS)


def fit_patch(patch, unet, scheduler, data: dict[str, torch.Tensor], out: Path, *, steps: int, batch_size: int,
              lr: float, weight_decay: float, warmup: int, seed: int, resume: bool, save_every: int,
              on_save=None, vae_scale_factor: int = 8) -> list[dict]:
    """SDXL (``text_time`` UNet): ``data["prompt"]`` is the packed conditioning (``train.encode``); the patch and
    the UNet both get its ``added_cond_kwargs`` (``time_ids`` from the latent size x ``vae_scale_factor``)."""
    from train.encode import split_conditioning

    accelerator = setup(seed)
    unet.requires_grad_(False).eval().to(accelerator.device)
    dataset = TensorDataset(data["latent"], data["prompt"], data["instruction"], data["kind"])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(patch.parameters(), lr=lr, weight_decay=weight_decay)
    lr_sched = lr_schedule(optimizer, steps, warmup)
    ckpt = out / "checkpoint.pt"
    step, log, _ = resume_from(ckpt, patch, optimizer, lr_sched) if resume else (0, [], {})
    if step:
        accelerator.print(f"resumed at step {step}")
    patch, optimizer, loader, lr_sched = accelerator.prepare(patch, optimizer, loader, lr_sched)
    alphas = scheduler.alphas_cumprod.to(accelerator.device)
    v_pred = scheduler.config.get("prediction_type", "epsilon") == "v_prediction"  # SD 2.x 768-v: the target is v
    bar = tqdm(total=steps, initial=step, desc="safepatch", disable=not accelerator.is_main_process, mininterval=5)
    t0, running = time.time(), {0: [], 1: [], 2: []}
    patch.train()
    while step < steps:
        for z0, c, s, kind in loader:
            eps = torch.randn_like(z0)
            t = torch.randint(0, len(alphas), (z0.shape[0],), device=z0.device)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            tf = t.float()
            with accelerator.autocast():
                c, added = split_conditioning(unet, c, zt, vae_scale_factor)
                res = patch(zt, tf, c, s, added_cond_kwargs=added)
                pred = unet(zt, tf, c, added_cond_kwargs=added, down_block_additional_residuals=tuple(res[:-1]),
                            mid_block_additional_residual=res[-1]).sample
            target = a.sqrt() * eps - (1 - a).sqrt() * z0 if v_pred else eps
            per = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
            loss = per.mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(patch.parameters(), 1.0)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad()
            for k in running:
                running[k] += per[kind == k].detach().tolist()
            step += 1
            bar.update()
            if step % 25 == 0 or step == steps:
                entry = {"step": step, "lr": lr_sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1),
                         **{f"loss_{n}": (sum(v) / len(v) if v else None)
                            for n, v in zip(("unsafe", "benign_empty", "benign_wrong"), running.values())}}
                log.append(entry)
                running = {0: [], 1: [], 2: []}
                bar.set_postfix(loss=f"{entry['loss_unsafe'] or 0:.4f}")
            if step % save_every == 0 or step == steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_checkpoint(ckpt, accelerator.unwrap_model(patch), optimizer, step, log, lr_sched.scheduler)
                    if on_save is not None:
                        on_save(accelerator.unwrap_model(patch), step, log)
            if step >= steps:
                break
    bar.close()
    patch.eval()
    return log
