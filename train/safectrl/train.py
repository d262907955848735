"""SafeCtrl's two training stages (one accelerate loop each) and the mask-IoU evaluation.

Stage 1, Unsafe Attention Block: detector features (the first cross-attention layer's input and text
attention output, frozen UNet, stopped right after that layer) of noised latents ``x_t = DDPM.add_noise(x0,
eps, t)``, t ~ U[0, t_max), are computed once and cached; loss ``lambda_ce * CE(A_cross, M') + lambda_mse *
||M - M'||^2`` with M' the exact tinyworld mask (area-pooled to the feature / latent size; CE target per
pixel: the category where M' >= 0.5, "safe" elsewhere). Samples: unsafe renders (mask), their safe
counterfactuals under the same unsafe prompt (mask 0) and benign renders (mask 0).

Stage 2, Safety Guidance Block: Diffusion-DPO (Wallace et al. 2023) on (x_w = safe counterfactual, x_l =
unsafe render, c = unsafe prompt), same t and noise for both:
``-log sigmoid(-beta/2 * ((|eps - eps_th(x_w)|^2 - |eps - eps_ref(x_w)|^2) - (|eps - eps_th(x_l)|^2 -
|eps - eps_ref(x_l)|^2)))`` (squared errors averaged per sample), plus ``sft_weight`` x a redirect term on
the REJECTED sample: at run time the guidance block acts on a trajectory that already holds the unsafe
concept, so on ``x_t = add_noise(x_l)`` the blended UNet is supervised towards the noise that denoises to the
safe counterfactual, ``eps* = (x_t - sqrt(abar_t) x_w) / sqrt(1 - abar_t)`` (equal to ``eps`` outside the
mask, where x_w == x_l), weighted ``min(SNR_t, gamma) / SNR_t`` (min-SNR: an x0-space error at low noise,
where eps* would blow up). ``sft_weight 0`` gives pure DPO. A share ``uncond_prob`` of the pairs uses the
empty prompt's embedding: with CFG the runtime blends the unconditional row with the same mask, so it must
be trained too. eps_th is the UNet with the Safety Guidance processors blending by the GROUND-TRUTH latent
mask during training (the detector's mask at run time); eps_ref is the frozen UNet. Only W_K', W_V' train.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guards.safectrl import DetectorFeaturesReady, SafeCtrl
from train.loop import lr_schedule, resume as resume_from, save_checkpoint, setup


# ---------------------------------------------------------------------------------------------------
# features for stage 1
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def detector_features(unet, safectrl: SafeCtrl, lat, emb, t) -> torch.Tensor:
    """Run the (processor-equipped) UNet up to the detect layer: features (N, P, C)."""
    state = safectrl.state
    state.reset()
    state.stop_after_detect = True
    try:
        unet(lat, t, encoder_hidden_states=emb, return_dict=False)
    except DetectorFeaturesReady:
        pass
    finally:
        state.stop_after_detect = False
    feats = state.features
    state.reset()
    return feats


def stage1_features(unet, safectrl, scheduler, lat, emb, mask, category, t_max, seed, batch=128, desc="features"):
    g = torch.Generator().manual_seed(seed)
    n = len(lat)
    t = torch.randint(0, t_max, (n,), generator=g)
    noise = torch.randn(lat.shape, generator=g)
    x_t = scheduler.add_noise(lat, noise, t)
    feats = torch.cat([detector_features(unet, safectrl, x_t[i:i + batch], emb[i:i + batch], t[i:i + batch])
                       for i in tqdm(range(0, n, batch), desc=desc, leave=False)])
    return {"feats": feats.half(), "mask": mask, "category": category, "t": t}


def stage1_loss(safectrl, feats, mask, category, latent_hw, lambda_ce, lambda_mse):
    p = feats.shape[1]
    f = int(round(math.sqrt(latent_hw[0] * latent_hw[1] / p)))
    hw = (latent_hw[0] // f, latent_hw[1] // f)
    logits, m_lat = safectrl.detect(feats.float(), hw, latent_hw)
    m_feat = F.adaptive_avg_pool2d(mask, hw).flatten(1)                       # (N, P)
    target = torch.where(m_feat >= 0.5, category[:, None], torch.zeros_like(category[:, None]))
    ce = F.nll_loss(torch.log(logits.clamp_min(1e-8)).reshape(-1, logits.shape[-1]), target.reshape(-1))
    mse = F.mse_loss(m_lat, mask)
    return lambda_ce * ce + lambda_mse * mse, ce, mse


def iou(pred: torch.Tensor, gt: torch.Tensor, thr: float = 0.5) -> float:
    """Pooled IoU over all samples: |pred>thr & gt>=0.5| / |pred>thr | gt>=0.5|."""
    p, g = pred > thr, gt >= 0.5
    union = (p | g).sum().item()
    return float((p & g).sum().item() / union) if union else 1.0


@torch.no_grad()
def evaluate_masks(unet, safectrl, scheduler, data, ts=(200, 400, 600), seed=123) -> dict:
    """Mask IoU on held-out (eval split) renders, per timestep and per group, plus benign false coverage."""
    ev, latent_hw = data["eval_pairs"], tuple(data["eval_pairs"]["mask"].shape[-2:])
    g = torch.Generator().manual_seed(seed)
    out = {"iou": {}, "iou_by_group": {}, "benign_max_mask": {}, "safe_cf_max_mask": {}}
    groups = ev["groups"]
    for t in ts:
        res = {}
        for key, lat, emb in (("unsafe", ev["lat_unsafe"], ev["emb"]), ("safe", ev["lat_safe"], ev["emb"]),
                              ("benign", data["benign"]["lat"][-200:], data["benign"]["emb"][-200:])):
            noise = torch.randn(lat.shape, generator=g)
            tt = torch.full((len(lat),), t)
            feats = detector_features(unet, safectrl, scheduler.add_noise(lat, noise, tt), emb, tt)
            p = feats.shape[1]
            f = int(round(math.sqrt(latent_hw[0] * latent_hw[1] / p)))
            res[key] = safectrl.detect(feats, (latent_hw[0] // f, latent_hw[1] // f), latent_hw)[1]
        out["iou"][str(t)] = round(iou(res["unsafe"], ev["mask"]), 4)
        out["iou_by_group"][str(t)] = {
            grp: round(iou(res["unsafe"][[i for i, x in enumerate(groups) if x == grp]],
                           ev["mask"][[i for i, x in enumerate(groups) if x == grp]]), 4)
            for grp in sorted(set(groups))}
        out["benign_max_mask"][str(t)] = round(float(res["benign"].amax(dim=(1, 2, 3)).mean()), 4)
        out["safe_cf_max_mask"][str(t)] = round(float(res["safe"].amax(dim=(1, 2, 3)).mean()), 4)
    out["iou_mean"] = round(sum(out["iou"].values()) / len(ts), 4)
    return out


# ---------------------------------------------------------------------------------------------------
# the loops
# ---------------------------------------------------------------------------------------------------

def train_stage1(acc, safectrl, feats: dict, *, steps, batch, lr, lambda_ce, lambda_mse, latent_hw, ckpt: Path,
                 resume: bool, seed=0) -> list:
    """Trains the Unsafe Attention Block only (its checkpoint holds nothing else: it resumes under another
    choice of blend layers)."""
    opt = torch.optim.AdamW(safectrl.uab.parameters(), lr=lr, weight_decay=1e-2)
    sched = lr_schedule(opt, steps)
    start, log, _ = resume_from(ckpt, safectrl.uab, opt, sched) if resume else (0, [], {})
    uab, opt = acc.prepare(safectrl.uab, opt)
    g = torch.Generator().manual_seed(seed + start)
    n = len(feats["feats"])
    bar = tqdm(range(start, steps), desc="stage1 UAB", initial=start, total=steps, mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, n, (batch,), generator=g)
        loss, ce, mse = stage1_loss(safectrl, feats["feats"][idx], feats["mask"][idx], feats["category"][idx],
                                    latent_hw, lambda_ce, lambda_mse)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.append({"stage": 1, "step": step, "loss": round(loss.item(), 5), "ce": round(ce.item(), 5),
                        "mse": round(mse.item(), 5)})
            bar.set_postfix(ce=f"{ce.item():.4f}", mse=f"{mse.item():.4f}")
        if (step + 1) % 200 == 0 or step == steps - 1:
            save_checkpoint(ckpt, safectrl.uab, opt, step + 1, log, sched)
    return log


def dpo_loss(unet, safectrl, scheduler, lat_w, lat_l, emb, mask, t, noise, beta, sft_weight, snr_gamma=5.0):
    x_w, x_l = scheduler.add_noise(lat_w, noise, t), scheduler.add_noise(lat_l, noise, t)
    x = torch.cat([x_w, x_l])
    tt, ee = torch.cat([t, t]), torch.cat([emb, emb])
    state = safectrl.state
    with torch.no_grad():
        state.reset()
        ref = unet(x, tt, encoder_hidden_states=ee, return_dict=False)[0]
    state.reset()
    state.blend = torch.cat([mask, mask])
    pred = unet(x, tt, encoder_hidden_states=ee, return_dict=False)[0]
    state.reset()
    target = torch.cat([noise, noise])
    err_th = (pred - target).pow(2).mean(dim=(1, 2, 3))
    err_ref = (ref - target).pow(2).mean(dim=(1, 2, 3))
    n = len(lat_w)
    diff_w, diff_l = err_th[:n] - err_ref[:n], err_th[n:] - err_ref[n:]
    inside = -0.5 * beta * (diff_w - diff_l)
    abar = scheduler.alphas_cumprod.to(lat_w.device)[t].reshape(-1, 1, 1, 1)
    redirect = (x_l - abar.sqrt() * lat_w) / (1 - abar).sqrt()          # the noise that denoises x_l to x_w
    snr = (abar / (1 - abar)).flatten()
    weight = snr.clamp(max=snr_gamma) / snr
    err_redirect = ((pred[n:] - redirect).pow(2).mean(dim=(1, 2, 3)) * weight).mean()
    loss = -F.logsigmoid(inside).mean() + sft_weight * err_redirect
    acc = (inside > 0).float().mean()
    return loss, acc, diff_w.mean(), diff_l.mean(), err_redirect


def train_stage2(acc, unet, safectrl, scheduler, pairs, empty_emb, *, steps, batch, lr, beta, sft_weight, t_max,
                 uncond_prob, ckpt: Path, resume: bool, seed=0) -> list:
    """Trains the Safety Guidance processors' W_K', W_V' only."""
    opt = torch.optim.AdamW(safectrl.processors.parameters(), lr=lr, weight_decay=0.0)
    sched = lr_schedule(opt, steps, warmup=20)
    start, log, _ = resume_from(ckpt, safectrl.processors, opt, sched) if resume else (0, [], {})
    procs, opt = acc.prepare(safectrl.processors, opt)
    g = torch.Generator().manual_seed(seed + 1000 + start)
    n = len(pairs["lat_unsafe"])
    bar = tqdm(range(start, steps), desc="stage2 DPO", initial=start, total=steps, mininterval=2.0)
    t0 = time.perf_counter()
    for step in bar:
        idx = torch.randint(0, n, (batch,), generator=g)
        t = torch.randint(0, t_max, (batch,), generator=g)
        noise = torch.randn(pairs["lat_unsafe"][idx].shape, generator=g)
        emb = pairs["emb"][idx].clone()
        emb[torch.rand(batch, generator=g) < uncond_prob] = empty_emb  # the CFG unconditional row, also blended
        loss, accuracy, dw, dl, red = dpo_loss(unet, safectrl, scheduler, pairs["lat_safe"][idx],
                                               pairs["lat_unsafe"][idx], emb, pairs["mask"][idx], t, noise, beta,
                                               sft_weight)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps - 1:
            log.append({"stage": 2, "step": step, "loss": round(loss.item(), 5), "reward_acc": round(accuracy.item(), 3),
                        "diff_w": round(dw.item(), 6), "diff_l": round(dl.item(), 6), "redirect": round(red.item(), 5),
                        "seconds": round(time.perf_counter() - t0, 1)})
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{accuracy.item():.2f}", redirect=f"{red.item():.4f}")
        if (step + 1) % 25 == 0 or step == steps - 1:
            save_checkpoint(ckpt, safectrl.processors, opt, step + 1, log, sched)
    return log


def blend_layers(unet, spec: str) -> list[str]:
    """``spec``: "all" or a comma list of module-path prefixes (``up_blocks.1``, ``mid_block``); the attn2
    processors under them, in the UNet's order."""
    cross = [n for n in unet.attn_processors if ".attn2." in n]
    if spec.strip() == "all":
        return cross
    prefixes = [p.strip().rstrip(".") for p in spec.split(",") if p.strip()]
    chosen = [n for n in cross if any(n.startswith(p + ".") for p in prefixes)]
    empty = [p for p in prefixes if not any(n.startswith(p + ".") for n in cross)]
    if empty or not chosen:
        raise SystemExit(f"--blend-layers {spec!r}: {', '.join(empty) or 'nothing'} matches no cross-attention "
                         f"layer of this UNet; pass 'all' or prefixes of: {', '.join(cross)}")
    return chosen


def run(args) -> dict:
    acc = setup(args.seed, args.threads)
    from diffusers import DDPMScheduler

    from export.families import load_backbone
    from train.safectrl.data import build_cache, encode_prompts

    t_start = time.perf_counter()
    out = Path(args.out)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.model)
    pipe, unet = backbone.pipeline, backbone.unet
    for module in (pipe.vae, pipe.text_encoder, unet):
        module.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    config = {"start_step_fraction": args.start_step_fraction, "mask_threshold": args.mask_threshold,
              "mask_gain": args.mask_gain, "latch_threshold": args.latch_threshold,
              "blend_layers": blend_layers(unet, args.blend_layers)}
    safectrl = SafeCtrl.for_unet(unet, **config)
    safectrl.install(unet)
    timings = {}

    t0 = time.perf_counter()
    data = build_cache(pipe, work / "data.pt", args.pairs, args.benign, args.eval_pairs, seed=args.seed)
    timings["cache_data_s"] = round(time.perf_counter() - t0, 1)

    # stage 1
    t0 = time.perf_counter()
    feat_path = work / "stage1_features.pt"
    if feat_path.is_file():
        feats = torch.load(feat_path, weights_only=False)
    else:
        p, b = data["pairs"], data["benign"]
        zeros = torch.zeros_like(p["mask"])
        lat = torch.cat([p["lat_unsafe"], p["lat_safe"], b["lat"]])
        emb = torch.cat([p["emb"], p["emb"], b["emb"]])
        mask = torch.cat([p["mask"], zeros, b["mask"]])
        cat = torch.cat([p["category"], torch.zeros_like(p["category"]), torch.zeros(len(b["lat"]), dtype=torch.long)])
        parts = [stage1_features(unet, safectrl, scheduler, lat, emb, mask, cat, args.t_max, args.seed + r,
                                 desc=f"features {r + 1}/{args.feature_draws}") for r in range(args.feature_draws)]
        feats = {k: torch.cat([q[k] for q in parts]) for k in parts[0]}
        torch.save(feats, feat_path)
    timings["stage1_features_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    log = train_stage1(acc, safectrl, feats, steps=args.stage1_steps, batch=args.stage1_batch, lr=args.stage1_lr,
                       lambda_ce=args.lambda_ce, lambda_mse=args.lambda_mse, latent_hw=tuple(data["pairs"]["mask"].shape[-2:]),
                       ckpt=work / "stage1.pt", resume=args.resume, seed=args.seed)
    timings["stage1_train_s"] = round(time.perf_counter() - t0, 1)
    del feats
    safectrl.eval()
    mask_eval = evaluate_masks(unet, safectrl, scheduler, data)
    tqdm.write(f"stage 1 mask IoU (eval split): {mask_eval['iou']} by group {mask_eval['iou_by_group']}")

    # stage 2
    t0 = time.perf_counter()
    if args.stage2_steps > 0:
        with torch.no_grad():
            empty_emb = encode_prompts(pipe, [""])[0]
        log += train_stage2(acc, unet, safectrl, scheduler, data["pairs"], empty_emb, steps=args.stage2_steps,
                            batch=args.stage2_batch, lr=args.stage2_lr, beta=args.beta, sft_weight=args.sft_weight,
                            t_max=args.stage2_t_max, uncond_prob=args.uncond_prob, ckpt=work / "stage2.pt",
                            resume=args.resume, seed=args.seed)
    timings["stage2_train_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)

    safectrl.save_pretrained(out)
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
               "mask_eval": mask_eval, "timings": timings, "log": log}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
