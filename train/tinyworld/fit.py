"""Train tinyworld from scratch — judge, then VAE, then text encoder + UNet — and write the model folder.

Each stage checkpoints into the work folder and resumes from there; a finished stage is skipped.
Outputs: ``OUT/`` a diffusers StableDiffusionPipeline folder (UNet stored in fp16 to stay small, loaded
back as fp32), and ``OUT-judge/`` (``judge.safetensors`` + ``config.json``).
"""

from __future__ import annotations

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

from export.families.clip_tokenizer import build_clip_tokenizer
from .data import Rendered, render_split
from .models import MAX_LENGTH, SCHEDULER_CONFIG, Judge, make_unet, make_vae, text_config
from .world import KINDS, UNSAFE_KINDS, vocabulary_corpus

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


# ---- text encoder + UNet -----------------------------------------------------------------------------

def fit_base(work: Path, vae, steps: int = 3600, batch: int = 64, n_scenes: int = 40000):
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel

    from runtime.tokenizer import CLIPTokenizer as LeanTokenizer

    tok_dir = work / "tokenizer"
    tok = LeanTokenizer(tok_dir)
    cache = work / "latents.npz"
    if cache.exists():
        z = np.load(cache)
        latents, ids = torch.from_numpy(z["latents"]), torch.from_numpy(z["ids"]).long()
    else:
        data = render_split("base", n_scenes, seed=31)
        with torch.no_grad():
            latents = torch.cat([vae.encode(_to_tensor(data.images[i:i + 256]) * 2 - 1).latent_dist.mean
                                 for i in tqdm(range(0, n_scenes, 256), desc="encode latents")])
        latents = latents * vae.config.scaling_factor
        ids = torch.from_numpy(tok(data.captions).input_ids).long()
        np.savez(cache, latents=latents.numpy(), ids=ids.numpy().astype(np.int32))
    empty = torch.from_numpy(tok([""]).input_ids).long()

    te = CLIPTextModel(text_config(len(tok.vocab), tok.bos_id, tok.eos_id, tok.pad_id))
    unet = make_unet()
    ema_te, ema_unet = CLIPTextModel(te.config), make_unet()
    params = list(te.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(200, steps, 0.1))
    ckpt, start = work / "base.ckpt", 0
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False)
        te.load_state_dict(s["te"]), unet.load_state_dict(s["unet"]), opt.load_state_dict(s["opt"])
        sched.load_state_dict(s["sched"]), ema_te.load_state_dict(s["ema_te"]), ema_unet.load_state_dict(s["ema_unet"])
        start = s["step"]
    else:
        ema_te.load_state_dict(te.state_dict()), ema_unet.load_state_dict(unet.state_dict())
    ema_params = list(ema_te.parameters()) + list(ema_unet.parameters())
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    g = torch.Generator().manual_seed(7 + start)
    te.train(), unet.train()
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc="text encoder + unet", mininterval=2.0)):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0, tokens = latents[idx], ids[idx].clone()
        tokens[torch.rand(batch, generator=g) < 0.1] = empty  # caption dropout for classifier-free guidance
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = noise_sched.add_noise(x0, noise, t)
        pred = unet(xt, t, te(tokens).last_hidden_state).sample
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
        if (step + 1) % 300 == 0 or step + 1 == steps:
            _atomic_torch_save({"te": te.state_dict(), "unet": unet.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "ema_te": ema_te.state_dict(),
                                "ema_unet": ema_unet.state_dict(), "step": step + 1}, ckpt)
    return ema_te.eval(), ema_unet.eval()


# ---- assembly --------------------------------------------------------------------------------------

def write_model_folder(out: Path, work: Path, vae, text_encoder, unet) -> None:
    """Save a diffusers StableDiffusionPipeline folder atomically (tmp folder, then rename)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = work / "tokenizer"
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=unet.half(), scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    unet.float()
    for f in ("vocab.json", "merges.txt"):  # CLIP layout for the lean tokenizer and CLIPTokenizer alike
        shutil.copy(tok_dir / f, tmp / "tokenizer" / f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_judge_folder(out: Path, work: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "judge.safetensors", out / "judge.safetensors")
    cfg = {"width": 16, "kinds": list(KINDS), "unsafe_kinds": list(UNSAFE_KINDS),
           "metrics_on_heldout_renders": json.loads((work / "judge_metrics.json").read_text())}
    from .world import BACKGROUNDS, COLOURS
    cfg["colours"], cfg["backgrounds"] = list(COLOURS), list(BACKGROUNDS)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def fit_all(out: Path, work: Path, judge_steps: int, vae_steps: int, base_steps: int) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (work / "tokenizer" / "vocab.json").exists():
        build_clip_tokenizer(vocabulary_corpus(), work / "tokenizer", merges=400, max_length=MAX_LENGTH)
    judge = fit_judge(work, judge_steps)
    print(f"[{(time.time() - t0) / 60:.1f} min] judge done")
    vae = fit_vae(work, judge, vae_steps)
    print(f"[{(time.time() - t0) / 60:.1f} min] vae done")
    te, unet = fit_base(work, vae, base_steps)
    print(f"[{(time.time() - t0) / 60:.1f} min] text encoder + unet done")
    write_model_folder(out, work, vae, te, unet)
    write_judge_folder(out.with_name(out.name + "-judge"), work)
    print(f"[{(time.time() - t0) / 60:.1f} min] wrote {out} and {out.name}-judge")
