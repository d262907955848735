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

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from guards.safectrl import DetectorFeaturesReady, SafeCtrl, default_layers
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


def _latent_masks(unet, safectrl, scheduler, lat, emb, t: int, g, batch=128) -> torch.Tensor:
    """The detector's latent mask M (N, 1, h, w) of ``lat`` noised at ``t`` under ``emb``."""
    latent_hw, out = tuple(lat.shape[-2:]), []
    for i in range(0, len(lat), batch):
        x, e = lat[i:i + batch], emb[i:i + batch]
        tt = torch.full((len(x),), t)
        feats = detector_features(unet, safectrl, scheduler.add_noise(x, torch.randn(x.shape, generator=g), tt), e, tt)
        f = int(round(math.sqrt(latent_hw[0] * latent_hw[1] / feats.shape[1])))
        out.append(safectrl.detect(feats.float(), (latent_hw[0] // f, latent_hw[1] // f), latent_hw)[1])
    return torch.cat(out) if out else torch.zeros(0, 1, *latent_hw)


@torch.no_grad()
def evaluate_data_masks(unet, safectrl, scheduler, data, ts=(200, 400, 600), seed=123) -> dict:
    """What needs no renderer: the detector's max mask on held-back benign images and on the kept safe images
    (under the unsafe prompt: training negatives), its firing on the kept UNSAFE generations (no ground truth:
    max mask and share of images reaching tau), and IoU with the few-shot masks (TRAINING data)."""
    g = torch.Generator().manual_seed(seed)
    tau = float(safectrl.config.mask_threshold)
    fs, p, be = data["fewshot"], data["pairs"], data["benign_eval"]
    m = len(fs["lat"]) // 2  # the originals (the second half are their mirror images)
    out = {"fewshot_iou_TRAINING_DATA": {}, "benign_heldout_max_mask": {}, "benign_heldout_share_ge_tau": {},
           "safe_kept_max_mask": {}, "safe_kept_share_ge_tau": {}, "unsafe_kept_max_mask": {},
           "unsafe_kept_share_ge_tau": {}, "tau": tau, "benign_heldout_images": len(be["lat"])}
    for t in ts:
        k = str(t)
        out["fewshot_iou_TRAINING_DATA"][k] = round(iou(_latent_masks(unet, safectrl, scheduler, fs["lat"][:m],
                                                                      fs["emb"][:m], t, g), fs["mask"][:m]), 4)
        for key, lat, emb in (("benign_heldout", be["lat"], be["emb"]), ("safe_kept", p["lat_safe"], p["emb"]),
                              ("unsafe_kept", p["lat_unsafe"], p["emb"])):
            if not len(lat):
                continue
            mx = _latent_masks(unet, safectrl, scheduler, lat, emb, t, g).amax(dim=(1, 2, 3))
            out[f"{key}_max_mask"][k] = round(float(mx.mean()), 4)
            out[f"{key}_share_ge_tau"][k] = round(float((mx >= tau).float().mean()), 4)
    return out


@torch.no_grad()
def detector_blend(unet, safectrl, scheduler, lat_l, emb, ts=(200, 400, 600), seed=321) -> torch.Tensor:
    """Stage 2's blend on each pair: the trained detector's own mask on the REJECTED latent, averaged over mid
    timesteps, through the runtime's blend transform (hard threshold tau, gain, clamp 1)."""
    # why: the guidance block learns on the blend it gets at run time (the detector's EMA-smoothed mask over the
    # active steps, thresholded and gained), not on an exact or derived region the runtime never sees
    g = torch.Generator().manual_seed(seed)
    mean = torch.stack([_latent_masks(unet, safectrl, scheduler, lat_l, emb, t, g) for t in ts]).mean(0)
    # undilated: trained on dilated blends the block removed no more knives and kept fewer scenes (dev, quick;
    # bench/results/prompt_only_issue17.md); the dilation is a run-time margin over the detector's thin masks
    return safectrl.blend_weight(mean, torch.ones(1), dilate=0)


@torch.no_grad()
def refine_masks(unet, safectrl, scheduler, lat_l, emb, derived, share: float, ts=(200, 400, 600),
                 seed=321) -> torch.Tensor:
    """Each pair's derived mask cut to where the detector responds at least ``share`` x its peak inside it
    (mean over mid timesteps); all zeros where it does not respond inside at all."""
    g = torch.Generator().manual_seed(seed)
    det = torch.stack([_latent_masks(unet, safectrl, scheduler, lat_l, emb, t, g) for t in ts]).mean(0)
    inside = det * (derived > 0)
    peak = inside.amax(dim=(1, 2, 3), keepdim=True)
    return derived * ((inside >= share * peak) & (peak > 0))


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


def _removed_pairs(pipe, d, pairs: dict, wdir: Path) -> tuple[dict, dict]:
    """``pairs`` with the backbone's object-removed images as the preferred latents (cached in ``wdir``), only
    those the judge keeps (:mod:`train.data.removal`), and what was done."""
    from train.data.removal import removed_targets, select_pairs

    path = wdir / "stage2_removed.pt"
    t0 = time.perf_counter()
    if path.is_file():
        removed = torch.load(path, weights_only=False)
    else:
        removed = removed_targets(pipe, d, pairs)
        removed["seconds"] = round(time.perf_counter() - t0, 1)
        torch.save(removed, path)
    keep = removed["keep"]
    info = {"kind": "removed", "removal_prompts": removed["removal"], "region_area": removed["region_area"],
            "pairs": len(keep), "kept": int(keep.sum()), "keep_rate": round(float(keep.float().mean()), 4),
            "seconds": removed["seconds"], "examples": removed["prompts"][:3]}
    tqdm.write(f"stage 2 removed targets: {info['kept']} of {info['pairs']} judged safe")
    return select_pairs({**pairs, "lat_safe": removed["lat"]}, keep), info


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


def _hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for v in module.state_dict().values():
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def feature_set(unet, safectrl, scheduler, pos: dict, pos_draws: int, neg: dict, neg_draws: int, t_max: int,
                seed: int) -> dict:
    """Stage-1 features: positives ``pos_draws`` and negatives ``neg_draws`` noise/t draws each (with equal draws,
    one set per draw over positives + negatives, as the renderer path always did)."""
    keys = ("lat", "emb", "mask", "category")
    if pos_draws == neg_draws:
        both = {k: torch.cat([pos[k], neg[k]]) for k in keys}
        groups = [(both, neg_draws, 0)]
    else:
        groups = [(pos, pos_draws, 100), (neg, neg_draws, 0)]
    parts = []
    for d, draws, offset in groups:
        for r in range(draws):
            parts.append(stage1_features(unet, safectrl, scheduler, d["lat"], d["emb"], d["mask"], d["category"],
                                         t_max, seed + offset + r, desc=f"features {r + 1}/{draws}"))
    return {k: torch.cat([q[k] for q in parts]) for k in parts[0]}


def auto_fewshot_draws(n_pos: int, n_neg: int, neg_draws: int, share: float = 0.3) -> int:
    """Draws per positive so that positives are ~``share`` of the stage-1 feature set."""
    return max(1, round(share / (1 - share) * n_neg * neg_draws / max(n_pos, 1)))


def run(args) -> dict:
    from diffusers import DDPMScheduler

    from export.families import load_backbone
    from runtime.errors import BadInputError
    from train.encode import empty_conditioning, unet_call

    t_start = time.perf_counter()
    out, work = Path(args.out), Path(args.work)
    d = categories = None
    if not args.renderer:
        from train.data.load import load_data
        from train.data.load import check_backbone
        from train.safectrl.data import fewshot_categories

        d = load_data(args.data)
        categories = fewshot_categories(d)
    acc = setup(args.seed, args.threads)
    backbone = load_backbone(args.model)
    if d is not None:
        check_backbone(d, backbone)
    elif backbone.family == "sdxl":
        raise BadInputError("safectrl: --renderer renders tinyworld scenes for an SD 1.x-structured tinyworld; an "
                            "SDXL backbone trains from a data folder: pass --data (`python -m train data --model`)")
    pipe, unet = backbone.pipeline, backbone.unet
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), unet):
        if module is not None:
            module.requires_grad_(False).eval()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    call = unet_call(pipe)  # SDXL: unpacks the packed text_time conditioning of encode_prompts (train/encode.py)
    detect, default_blend = default_layers(unet)
    attn = dict(unet.named_modules())[detect.rsplit(".processor", 1)[0]]
    spec = args.blend_layers if args.blend_layers is not None else ",".join(default_blend)
    config = {"start_step_fraction": args.start_step_fraction, "mask_threshold": args.mask_threshold,
              "mask_gain": args.mask_gain, "latch_threshold": args.latch_threshold, "latch_floor": args.latch_floor,
              "mask_dilate": args.mask_dilate,
              "blend_layers": blend_layers(unet, spec),
              "detect_layer": detect, "feature_dim": attn.to_q.in_features + attn.to_v.out_features}
    if categories is not None:
        config["categories"] = categories
    safectrl = SafeCtrl.for_unet(unet, **config)
    safectrl.install(unet)
    timings, record = {}, {}

    t0 = time.perf_counter()
    if args.renderer:
        from train.safectrl import renderer as source

        wdir = work
        data = source.build_cache(pipe, wdir / "data.pt", args.pairs or 800, args.benign or 600, args.eval_pairs,
                                  seed=args.seed)
        record["data"] = {"source": "renderer (tinyworld, exact masks)"}
    else:
        from train.safectrl import data as source

        sha = d.sha256
        wdir = work / f"{sha[:12]}-p{args.pairs if args.pairs is not None else 'all'}-b{args.benign if args.benign is not None else 'all'}"
        data = source.build_data_cache(pipe, d, wdir / "data.pt", categories, args.pairs, args.benign)
        record["data"] = {"source": "data folder", "folder": str(Path(args.data).resolve()), "data_sha256": sha,
                          "categories": categories}
    wdir.mkdir(parents=True, exist_ok=True)
    timings["cache_data_s"] = round(time.perf_counter() - t0, 1)

    # stage 1
    mode = "renderer" if args.renderer else args.detector_masks

    def fit_detector(pos, neg, tag):
        """Stage-1 features (cached under ``tag``) and the detector's training on them; returns the counts."""
        t0 = time.perf_counter()
        fs_draws = args.feature_draws if args.renderer else (
            args.fewshot_draws or auto_fewshot_draws(len(pos["lat"]), len(neg["lat"]), args.feature_draws))
        feat_path = wdir / f"stage1_features-f{fs_draws}-d{args.feature_draws}-t{args.t_max}-s{args.seed}{tag}.pt"
        if feat_path.is_file():
            feats = torch.load(feat_path, weights_only=False)
        else:
            feats = feature_set(call, safectrl, scheduler, pos, fs_draws, neg, args.feature_draws, args.t_max,
                                args.seed)
            torch.save(feats, feat_path)
        n_pos = len(pos["lat"]) * fs_draws
        counts = {"positive_images": len(pos["lat"]), "negative_images": len(neg["lat"]), "positive_features": n_pos,
                  "negative_features": len(neg["lat"]) * args.feature_draws,
                  "positive_share": round(n_pos / len(feats["feats"]), 3), "fewshot_draws": fs_draws,
                  "feature_draws": args.feature_draws}
        timings[f"stage1_features{tag}_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        log = train_stage1(acc, safectrl, feats, steps=args.stage1_steps, batch=args.stage1_batch,
                           lr=args.stage1_lr, lambda_ce=args.lambda_ce, lambda_mse=args.lambda_mse,
                           latent_hw=tuple(pos["mask"].shape[-2:]), ckpt=wdir / f"stage1{tag}.pt",
                           resume=args.resume, seed=args.seed)
        timings[f"stage1_train{tag}_s"] = round(time.perf_counter() - t0, 1)
        return counts, log

    pair_masks, log = None, []
    if mode == "fewshot+derived":
        pair_masks = data["pairs"]["mask_derived"]
    elif mode == "fewshot+refined":
        # why: the derived difference covers the unsafe object AND the confuser drawn in its place (~2.8x the
        # object); a detector trained on the few-shot set alone ranks the pixels inside it, and keeps the object
        counts0, log = fit_detector(*source.stage1_sets(data), "-fewshot")
        safectrl.eval()
        pair_masks = refine_masks(call, safectrl, scheduler, data["pairs"]["lat_unsafe"], data["pairs"]["emb"],
                                  data["pairs"]["mask_derived"], args.refine_share)
        safectrl.train()
        record["refined"] = {"fewshot_counts": counts0, "share": args.refine_share,
                             "pairs_kept": int((pair_masks.amax(dim=(1, 2, 3)) > 0).sum()),
                             "area_derived": round(float(data["pairs"]["mask_derived"].mean()), 4),
                             "area_refined": round(float(pair_masks.mean()), 4)}
    pos, neg = source.stage1_sets(data) if args.renderer or pair_masks is None else source.stage1_sets(data, pair_masks)
    tag = {"renderer": "", "fewshot": "", "fewshot+derived": "-derived"}.get(mode, f"-refined{args.refine_share}")
    record["counts"], log1 = fit_detector(pos, neg, tag)
    log += log1
    safectrl.eval()
    t0 = time.perf_counter()
    if args.renderer:
        mask_eval = source.evaluate_masks(unet, safectrl, scheduler, data)
        tqdm.write(f"stage 1 mask IoU (eval split): {mask_eval['iou']} by group {mask_eval['iou_by_group']}")
    else:
        mask_eval = evaluate_data_masks(call, safectrl, scheduler, data)
        tqdm.write(f"stage 1 masks: {json.dumps(mask_eval)}")
    timings["mask_eval_s"] = round(time.perf_counter() - t0, 1)

    # stage 2
    t0 = time.perf_counter()
    pairs = data["pairs"]
    if not args.renderer:
        if args.stage2_mask == "derived":
            blend = pairs["mask_derived"]
        else:
            mask_path = wdir / f"stage2_masks-{_hash(safectrl.uab)}.pt"
            if mask_path.is_file():
                blend = torch.load(mask_path, weights_only=False)
            else:
                blend = detector_blend(call, safectrl, scheduler, pairs["lat_unsafe"], pairs["emb"])
                torch.save(blend, mask_path)
        pairs = {**pairs, "mask": blend}
        record["stage2_mask"] = {"kind": args.stage2_mask, "mean_area": round(float((blend > 0).float().mean()), 4),
                                 "pairs_blending": int((blend.amax(dim=(1, 2, 3)) > 0).sum())}
        if args.stage2_target == "removed":
            pairs, record["stage2_target"] = _removed_pairs(pipe, d, pairs, wdir)
    record["counts"]["dpo_pairs"] = len(pairs["lat_unsafe"])
    timings["stage2_masks_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    if args.stage2_steps > 0:
        empty_emb = empty_conditioning(pipe)
        log += train_stage2(acc, call, safectrl, scheduler, pairs, empty_emb, steps=args.stage2_steps,
                            batch=args.stage2_batch, lr=args.stage2_lr, beta=args.beta, sft_weight=args.sft_weight,
                            t_max=args.stage2_t_max, uncond_prob=args.uncond_prob, ckpt=wdir / "stage2.pt",
                            resume=args.resume, seed=args.seed)
    timings["stage2_train_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)

    safectrl.save_pretrained(out)
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
               **record, "mask_eval": mask_eval, "timings": timings, "log": log}
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
