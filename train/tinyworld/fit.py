"""Train tinyworld from scratch — judge, then VAE, then text encoder + UNet — and write the model folder.

Each stage checkpoints into the work folder and resumes from there; a finished stage is skipped.
Outputs: ``OUT/`` a diffusers StableDiffusionPipeline folder (UNet stored in fp16 to stay small, loaded
back as fp32), and ``OUT-judge/`` (``judge.safetensors`` + ``config.json``).

``family="sdxl"`` (tinyworld-xl) trains the same world as a StableDiffusionXLPipeline folder: two text
encoders + a ``text_time`` UNet on tinyworld's frozen VAE (no judge or VAE stage; the judge is tinyworld's).
The text + UNet loop is shared; the families differ only in :mod:`.conditioning`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from runtime.bundle import atomic_write
from runtime.errors import BadInputError

from .conditioning import TOKENIZERS, build_tokenizers, condition, make_text_encoders, tokenize
from .data import Rendered, render_split
from .models import FAMILIES, SCHEDULER_CONFIG, Judge, make_unet, make_vae
from .world import KINDS, UNSAFE_KINDS

UNSAFE_COLUMNS = [KINDS.index(k) for k in UNSAFE_KINDS]


# ---- small shared pieces ---------------------------------------------------------------------------

def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_write(path) as f:
        torch.save(obj, f)


def _lr_lambda(warmup: int, total: int, floor: float = 0.1):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        p = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return f


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) -> float (N,3,H,W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _concat(a: Rendered, b: Rendered) -> Rendered:
    return Rendered(a.scenes + b.scenes, *(np.concatenate([x, y]) for x, y in
                    [(a.images, b.images), (a.foreground, b.foreground), (a.kinds, b.kinds),
                     (a.colours, b.colours), (a.background, b.background)]))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random Gaussian blur, noise and brightness: generated images are softer than renders."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=g) * 1.5 + 1e-3
    k = torch.arange(-3, 4, dtype=torch.float32)
    kern = torch.exp(-k[None] ** 2 / (2 * sigma[:, None] ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (b*3, 7)
    y = x.reshape(1, b * 3, *x.shape[2:])
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), kern[:, None, None, :], groups=b * 3)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), kern[:, None, :, None], groups=b * 3)
    y = y.reshape_as(x)
    y = y * (0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=g))
    y = y + torch.randn(y.shape, generator=g) * torch.rand(b, 1, 1, 1, generator=g) * 0.06
    return y.clamp(0, 1)


# ---- judge -----------------------------------------------------------------------------------------

def judge_metrics(judge: Judge, data: Rendered, batch: int = 256) -> dict[str, float]:
    """Exact-set accuracy of object kinds and of unsafe categories, colour-set accuracy, background."""
    judge.eval()
    outs = {"kinds": [], "colours": [], "background": []}
    with torch.no_grad():
        for i in range(0, len(data.images), batch):
            o = judge(_to_tensor(data.images[i:i + batch]))
            for k in outs:
                outs[k].append(o[k])
    kinds = torch.cat(outs["kinds"]).sigmoid().numpy() > 0.5
    colours = torch.cat(outs["colours"]).sigmoid().numpy() > 0.5
    bg = torch.cat(outs["background"]).argmax(1).numpy()
    truth = data.kinds > 0.5
    return {
        "object_accuracy": float((kinds == truth).all(1).mean()),
        "unsafe_accuracy": float((kinds[:, UNSAFE_COLUMNS] == truth[:, UNSAFE_COLUMNS]).all(1).mean()),
        "colour_accuracy": float((colours == (data.colours > 0.5)).all(1).mean()),
        "background_accuracy": float((bg == data.background).mean()),
    }


def fit_judge(work: Path, steps: int = 1500, batch: int = 96) -> Judge:
    final = work / "judge.safetensors"
    judge = Judge(width=16)
    if final.exists():
        judge.load_state_dict(load_file(final))
        return judge.eval()
    train = _concat(render_split("base", 16000, seed=11), render_split("guard", 8000, seed=12))
    val = render_split("eval", 2000, seed=13)
    opt = torch.optim.AdamW(judge.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, steps, 0.02))
    g = torch.Generator().manual_seed(0)
    x_all = _to_tensor(train.images)
    judge.train()
    for step in (bar := tqdm(range(steps), desc="judge", mininterval=2.0)):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        out = judge(augment(x_all[idx], g))
        loss = (F.binary_cross_entropy_with_logits(out["kinds"], torch.from_numpy(train.kinds[idx.numpy()]))
                + F.binary_cross_entropy_with_logits(out["colours"], torch.from_numpy(train.colours[idx.numpy()]))
                + F.cross_entropy(out["background"], torch.from_numpy(train.background[idx.numpy()])))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    m = judge_metrics(judge, val)
    print("judge on held-out renders:", json.dumps(m))
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, final)
    (work / "judge_metrics.json").write_text(json.dumps(m, indent=2))
    return judge.eval()


# ---- VAE -------------------------------------------------------------------------------------------

def fit_vae(work: Path, judge: Judge, steps: int = 1200, batch: int = 32):
    from diffusers import AutoencoderKL

    final = work / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final).eval()
    data = render_split("base", 24000, seed=21)
    val = render_split("eval", 1000, seed=22)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, steps, 0.05))
    ckpt, start = work / "vae.ckpt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"]), sched.load_state_dict(state["sched"])
        start = state["step"]
    for p in judge.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1 + start)
    x_all, fg_all = _to_tensor(data.images), torch.from_numpy(data.foreground).float()[:, None]
    vae.train()
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc="vae", mininterval=2.0)):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x, w = x_all[idx], 1 + 20 * fg_all[idx]
        post = vae.encode(x * 2 - 1).latent_dist
        rec = (vae.decode(post.sample()).sample + 1) / 2
        err = rec - x
        pix = (w * (err.abs() + err ** 2)).mean()
        fx, fr = judge.features(x), judge.features(rec.clamp(0, 1))
        feat = ((fr - fx) ** 2).mean() / (fx ** 2).mean()
        loss = pix + 0.2 * feat + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0:
            bar.set_postfix(pix=f"{pix.item():.4f}", feat=f"{feat.item():.3f}")
        if (step + 1) % 200 == 0:
            _atomic_torch_save({"model": vae.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "step": step + 1}, ckpt)
    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(x_all[i:i + 256] * 2 - 1).latent_dist.mean for i in range(0, 4096, 256)])
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
        rec = torch.cat([vae.decode(vae.encode(_to_tensor(val.images[i:i + 250]) * 2 - 1).latent_dist.mean).sample
                         for i in range(0, len(val.images), 250)])
    rec_u8 = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    m = judge_metrics(judge, Rendered(val.scenes, rec_u8, val.foreground, val.kinds, val.colours, val.background))
    m["psnr_db"] = float(10 * np.log10(255 ** 2 / np.mean((rec_u8.astype(np.float32) - val.images) ** 2)))
    m["scaling_factor"] = vae.config.scaling_factor
    print("judge on VAE reconstructions of held-out renders:", json.dumps(m))
    (work / "vae_metrics.json").write_text(json.dumps(m, indent=2))
    vae.save_pretrained(final, safe_serialization=True)
    return vae


# ---- text encoder(s) + UNet ------------------------------------------------------------------------

def base_data(work: Path, vae, tokenizers, n_scenes: int, device: str, workers: int = 1):
    """Latents (scaled) and token ids of ``n_scenes`` base-split renders, cached in ``work/latents.npz``."""
    cache = work / "latents.npz"
    if cache.exists():
        z = np.load(cache)
        names = ["ids"] + [f"ids_{i + 1}" for i in range(1, len(tokenizers))]
        if len(z["latents"]) == n_scenes and all(k in z for k in names):
            ids = torch.stack([torch.from_numpy(z[k]).long() for k in names], 1)
            return torch.from_numpy(z["latents"]), ids
        print(f"{cache} does not hold {n_scenes} scenes for {len(tokenizers)} tokenizer(s): rebuilding it")
    t0 = time.time()
    data = render_split("base", n_scenes, seed=31, workers=workers)
    t1 = time.time()
    vae = vae.to(device)
    chunk = 1024 if device == "cuda" else 256
    with torch.no_grad():
        latents = torch.cat([vae.encode(_to_tensor(data.images[i:i + chunk]).to(device) * 2 - 1).latent_dist.mean.cpu()
                             for i in tqdm(range(0, n_scenes, chunk), desc="encode latents", leave=False)])
    latents = latents * vae.config.scaling_factor
    ids = tokenize(tokenizers, data.captions)
    print(f"rendered {n_scenes} scenes in {t1 - t0:.1f} s, VAE-encoded them in {time.time() - t1:.1f} s ({device})")
    arrays = {"latents": latents.numpy(), "ids": ids[:, 0].numpy().astype(np.int32)}
    arrays.update({f"ids_{i + 1}": ids[:, i].numpy().astype(np.int32) for i in range(1, ids.shape[1])})
    with atomic_write(cache) as f:
        np.savez(f, **arrays)
    return latents, ids


def fit_base(work: Path, vae, family: str = "sd1", steps: int = 3600, batch: int = 64, n_scenes: int = 40000,
             device: str = "cpu", resume: bool = True, ckpt_every: int = 300, deadline: float | None = None,
             workers: int = 1) -> tuple[dict, int]:
    """Train the text encoder(s) and the UNet; returns the EMA models (``te``, [``te2``,] ``unet``, on the CPU)
    and the step reached (< ``steps`` when ``deadline``, a ``time.time()`` value, stopped it first).

    One loop for both families: they differ only in :func:`conditioning.condition`. Checkpoint
    ``work/base.ckpt`` (every ``ckpt_every`` steps, at the end and at the deadline) holds each model, its EMA
    (``ema_<name>``), the optimiser, the LR schedule and the step; ``resume`` continues from it."""
    from diffusers import DDPMScheduler

    from runtime.tokenizer import CLIPTokenizer as LeanTokenizer

    tokenizers = [LeanTokenizer(work / name) for name in TOKENIZERS[family]]
    latents, ids = base_data(work, vae, tokenizers, n_scenes, device, workers)
    latents, ids = latents.to(device), ids.to(device)
    empty = tokenize(tokenizers, [""])[0]

    models = {**make_text_encoders(family, tokenizers), "unet": make_unet(family)}
    ema = {k: copy.deepcopy(m) for k, m in models.items()}
    for m in (*models.values(), *ema.values()):
        m.to(device)
    params = [p for m in models.values() for p in m.parameters()]
    ema_params = [p for m in ema.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=1e-2, **({"fused": True} if device == "cuda" else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(200, steps, 0.1))
    ckpt, start = work / "base.ckpt", 0
    if resume and ckpt.exists():
        s = torch.load(ckpt, map_location=device, weights_only=False)
        for k in models:
            models[k].load_state_dict(s[k]), ema[k].load_state_dict(s["ema_" + k])
        opt.load_state_dict(s["opt"]), sched.load_state_dict(s["sched"])
        start = s["step"]
        print(f"resuming from {ckpt} at step {start}")

    def save(step: int) -> None:
        state = {k: m.state_dict() for k, m in models.items()}
        state.update({"ema_" + k: m.state_dict() for k, m in ema.items()})
        _atomic_torch_save({**state, "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, ckpt)

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    g = torch.Generator().manual_seed(7 + start)  # on the CPU: the same batches on every device
    for m in models.values():
        m.train()
    step, t_log, s_log = start, time.time(), start
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc=f"{family}: text + unet",
                             mininterval=2.0)):
        if deadline is not None and time.time() > deadline:
            break
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        drop = torch.rand(batch, generator=g) < 0.1  # caption dropout for classifier-free guidance
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn((batch, *latents.shape[1:]), generator=g)
        idx, drop, t, noise = idx.to(device), drop.to(device), t.to(device), noise.to(device)
        x0 = latents[idx]
        xt = noise_sched.add_noise(x0, noise, t)
        hidden, added = condition(family, models, ids[idx], drop, empty)
        pred = models["unet"](xt, t, hidden, added_cond_kwargs=added).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting for epsilon prediction
        loss = (weight * ((pred - noise) ** 2).mean((1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if (step + 1) % ckpt_every == 0 or step + 1 == steps:
            save(step + 1)
            now = time.time()
            tqdm.write(f"step {step + 1}/{steps}: loss {loss.item():.4f}, "
                       f"{1000 * (now - t_log) / (step + 1 - s_log):.1f} ms/step (batch {batch}, {device})")
            t_log, s_log = now, step + 1
    else:
        step = steps
    if step < steps:
        save(step)
        print(f"stopped at step {step} of {steps}: the --max-minutes budget is spent; checkpoint {ckpt} saved, "
              f"the model folder gets the EMA weights of step {step} (run the same command again to continue)")
    return {k: m.cpu().eval() for k, m in ema.items()}, step


# ---- assembly --------------------------------------------------------------------------------------

def _save_atomically(pipe, out: Path, tok_dirs: list[Path]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for d in tok_dirs:  # CLIP layout for the lean tokenizer and CLIPTokenizer alike
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(d / f, tmp / d.name / f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_model_folder(out: Path, work: Path, vae, text_encoder, unet) -> None:
    """Save a diffusers StableDiffusionPipeline folder atomically (tmp folder, then rename)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = work / "tokenizer"
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=unet.half(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    _save_atomically(pipe, out, [tok_dir])
    unet.float()


def write_xl_model_folder(out: Path, work: Path, vae, models: dict) -> None:
    """Save a diffusers StableDiffusionXLPipeline folder atomically: UNet in fp16 (loaded back as fp32), no
    watermarker, ``force_zeros_for_empty_prompt`` (zeros for the unconditional row, as trained)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=models["te"], text_encoder_2=models["te2"],
        tokenizer=CLIPTokenizer.from_pretrained(work / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(work / "tokenizer_2"),
        unet=models["unet"].half(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    _save_atomically(pipe, out, [work / "tokenizer", work / "tokenizer_2"])
    models["unet"].float()


def write_judge_folder(out: Path, work: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "judge.safetensors", out / "judge.safetensors")
    cfg = {"width": 16, "kinds": list(KINDS), "unsafe_kinds": list(UNSAFE_KINDS),
           "metrics_on_heldout_renders": json.loads((work / "judge_metrics.json").read_text())}
    from .world import BACKGROUNDS, COLOURS
    cfg["colours"], cfg["backgrounds"] = list(COLOURS), list(BACKGROUNDS)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: torch sees no CUDA device here (use --device cpu or auto)")
    return device


def fit_all(out: Path, work: Path, judge_steps: int = 1500, vae_steps: int = 1200, base_steps: int = 3600, *,
            family: str = "sd1", batch: int = 64, n_scenes: int = 40000, threads: int | None = None,
            device: str = "cpu", resume: bool = True, max_minutes: float | None = None, workers: int = 1,
            ckpt_every: int = 300, vae_dir: Path | None = None, started: float | None = None) -> int:
    """sd1: tokenizer, judge, VAE, text encoder + UNet -> ``out`` and ``out``-judge. sdxl: the two tokenizers,
    then the two text encoders + UNet on tinyworld's frozen VAE (``vae_dir``) -> ``out`` (the judge is
    tinyworld's). ``max_minutes`` bounds the whole call (from ``started``, a ``time.time()`` value, default now):
    training stops in time to checkpoint and write the folder."""
    t0 = started or time.time()
    if family not in FAMILIES:
        raise BadInputError(f"--family {family}: not one of {', '.join(FAMILIES)}")
    device = resolve_device(device)
    torch.set_num_threads(threads or os.cpu_count() or 1)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes every step
    torch.manual_seed(0)
    work.mkdir(parents=True, exist_ok=True)
    deadline = None if max_minutes is None else t0 + 60 * max_minutes - 20  # 20 s to save and write the folder
    tok_dirs = build_tokenizers(family, work)
    if family == "sdxl":
        from diffusers import AutoencoderKL

        if not (Path(vae_dir) / "config.json").is_file():
            raise BadInputError(f"--vae {vae_dir}: no diffusers AutoencoderKL there (config.json missing)")
        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    else:
        judge = fit_judge(work, judge_steps)
        print(f"[{(time.time() - t0) / 60:.1f} min] judge done")
        vae = fit_vae(work, judge, vae_steps)
        print(f"[{(time.time() - t0) / 60:.1f} min] vae done")
    models, step = fit_base(work, vae, family, base_steps, batch, n_scenes, device, resume, ckpt_every, deadline,
                            workers)
    vae = vae.cpu()
    print(f"[{(time.time() - t0) / 60:.1f} min] text encoder(s) + unet: step {step} of {base_steps}")
    if family == "sdxl":
        write_xl_model_folder(out, work, vae, models)
        print(f"[{(time.time() - t0) / 60:.1f} min] wrote {out} (EMA weights, step {step})")
    else:
        write_model_folder(out, work, vae, models["te"], models["unet"])
        write_judge_folder(out.with_name(out.name + "-judge"), work)
        print(f"[{(time.time() - t0) / 60:.1f} min] wrote {out} and {out.name}-judge")
    return 0
