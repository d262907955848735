"""SafeRedir training loop: stage 1 classifier CE on trajectory latents, stage 2 delta generator (classifier
frozen) with the diffusion / teacher / identity / sparsity losses of ``losses.py``. One ``accelerate`` loop per
stage; checkpoint every ``--ckpt-every`` steps to ``<cache>/stage<N>.pt``; ``--resume`` continues from them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from accelerate import DistributedDataParallelKwargs
from tqdm import tqdm

from guards.saferedir import SafeRedir
from guards.storage import atomic_path
from runtime.errors import BadInputError
from train.encode import sdxl_time_ids
from train.loop import resume, save_checkpoint, setup

from .losses import classifier_loss, redirect_loss

WEIGHTS = {"dm": 1.0, "kd": 3.0, "id": 0.002, "mask_benign": 0.002, "mask": 0.0002, "scale": 0.0}
"""Loss weights of stage 2: the regularisers orders of magnitude below the diffusion terms, or the mask collapses
to 0 (bench/results/design_measurements.md)."""


def fit(args, source_class) -> dict:
    """``source_class(args, backbone)``: :class:`train.saferedir.data.DataSource` or the renderer's."""
    if args.adversarial < 0:
        raise BadInputError(f"saferedir: --adversarial {args.adversarial}: pass 0 (off) or a number of variants")
    if not 0 < args.adversarial_share <= 1:
        raise BadInputError(f"saferedir: --adversarial-share {args.adversarial_share}: pass a share in (0, 1]")
    acc = setup(args.seed, args.threads, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    from export.families import load_backbone

    backbone = load_backbone(args.model)
    pipe = backbone.pipeline
    unet = pipe.unet.eval().requires_grad_(False)
    for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), pipe.vae):
        if m is not None:
            m.eval().requires_grad_(False)
    t0 = time.perf_counter()
    source = source_class(args, backbone)
    if backbone.family == "sdxl" and getattr(args, "renderer", False):
        raise BadInputError("saferedir --renderer: tinyworld's renderer path is SD 1.x only; train an SDXL "
                            "backbone from --data (`python -m train data --model ...`)")
    if args.adversarial > 0 and getattr(args, "renderer", False):
        raise BadInputError("saferedir --adversarial: the attack-style edits train from --data, not the renderer: "
                            "drop --adversarial")  # refused before the data step, not after it
    with acc.main_process_first():
        d = source.build()
    data_s = time.perf_counter() - t0
    model = SafeRedir.for_backbone(backbone, alpha=args.alpha, check_every=args.check_every,
                                   first_check=args.first_check, threshold=args.threshold)
    log = []
    g = torch.Generator().manual_seed(args.seed * 100 + acc.process_index)

    # held-out validation: the last 10% of prompts of each class (whole trajectories)
    labels = torch.from_numpy(d["traj_label"])
    n = len(labels)
    val = torch.zeros(n, dtype=torch.bool)
    for c in (0, 1):
        idx = torch.nonzero(labels == c)[:, 0]
        val[idx[-max(1, len(idx) // 10):]] = True
    xs, ts = torch.from_numpy(d["traj_x"]), torch.from_numpy(d["traj_t"])
    emb = torch.from_numpy(d["traj_emb"])
    train_idx, val_idx = torch.nonzero(~val)[:, 0], torch.nonzero(val)[:, 0]
    steps_per = xs.shape[1]

    uncond = torch.from_numpy(d["uncond_emb"])
    # step-0 text samples: the first check sees pure noise at timesteps[0], so any guard-split prompt paired with
    # fresh N(0, 1) noise is an exact step-0 input; many more prompts than trajectories, at no UNet cost
    with acc.main_process_first():
        t_emb, t_lab = source.text_samples()
    t_emb, t_lab = torch.from_numpy(t_emb), torch.from_numpy(t_lab)

    def cls_batch(pool, b):
        """Trajectory latents; with probability ``--prompt-dropout`` the prompt is replaced by the empty
        prompt's embedding, so the classifier must also read the latent (held-out synonyms, paraphrases)."""
        i = pool[torch.randint(0, len(pool), (b,), generator=g)]
        k = torch.randint(0, steps_per, (b,), generator=g)
        e = emb[i].clone()
        drop = torch.rand(b, generator=g) < args.prompt_dropout
        e[drop] = uncond
        x, t, y = xs[i, k].float(), ts[k], labels[i]
        if len(t_lab):  # a quarter of the batch: step-0 text samples
            q = b // 4
            j = torch.randint(0, len(t_lab), (q,), generator=g)
            x[:q] = torch.randn(x[:q].shape, generator=g)
            t[:q], e[:q], y[:q] = ts[0], t_emb[j], t_lab[j]
        return x, t, e, y

    # ---- stage 1: classifier ---------------------------------------------------------------------------
    stages = [(1, args.cls_steps, args.cls_lr, [p for n_, p in model.named_parameters()
                                                 if n_.startswith(SafeRedir.CLASSIFIER_PREFIXES)]),
              (2, args.gen_steps, args.gen_lr, [p for n_, p in model.named_parameters()
                                                if not n_.startswith(SafeRedir.CLASSIFIER_PREFIXES)])]
    benign_pool = torch.nonzero(labels[train_idx] == 0)[:, 0]
    z0, e_u, e_cf = (torch.from_numpy(d[k]) for k in ("pair_z0", "pair_emb", "pair_cf_emb"))
    sdxl = "traj_pooled" in d  # SDXL: the pooled text_embeds are redirected and fed too (losses.py)
    if sdxl:
        p_traj, p_u, p_cf = (torch.from_numpy(d[k]) for k in ("traj_pooled", "pair_pooled", "pair_cf_pooled"))
    alphas = pipe.scheduler.alphas_cumprod.float()
    metrics = {"data_seconds": round(data_s, 1), **source.describe(d)}
    adv = None
    if args.adversarial > 0:
        from .adversarial import adversarial_pairs

        with acc.main_process_first():
            a = adversarial_pairs(pipe, d, args.cache, args.adversarial, args.seed)
        adv_pair = torch.from_numpy(a["pair"])
        metrics["adversarial_variants"] = int(len(adv_pair))
        adv = (torch.from_numpy(a["emb"]), torch.from_numpy(a["pooled"]) if sdxl else None,
               [torch.nonzero(adv_pair == k)[:, 0] for k in range(len(z0))])
    for stage, total, lr, params in stages:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        ckpt = Path(args.cache) / f"stage{stage}.pt"
        start, saved_log, _ = resume(ckpt, model, opt) if args.resume else (0, [], {})
        log = saved_log if start else log
        wrapped, opt = acc.prepare(model, opt)
        wrapped.train()
        bar = tqdm(range(start, total), desc=f"stage {stage}", disable=not acc.is_local_main_process,
                   mininterval=5.0)
        for step in bar:
            if stage == 1:
                x, t, e, y = cls_batch(train_idx, args.batch)
                loss, info = classifier_loss(wrapped(x, t, e, part="classify"), y)
            else:
                i = torch.randint(0, len(z0), (args.gen_batch,), generator=g)
                j = train_idx[benign_pool[torch.randint(0, len(benign_pool), (args.gen_batch,), generator=g)]]
                unsafe_rows, unsafe_pooled = e_u[i], (p_u[i] if sdxl else None)
                if adv is not None:
                    unsafe_rows, unsafe_pooled = _attacked(unsafe_rows, unsafe_pooled, i, adv,
                                                           args.adversarial_share, g)
                pooled = torch.cat([unsafe_pooled, p_traj[j]]) if sdxl else None
                both = wrapped(None, None, torch.cat([unsafe_rows, emb[j]]), pooled, part="redirect")
                out_u = tuple(o[: args.gen_batch] for o in both)
                out_b = tuple(o[args.gen_batch:] for o in both)
                added = ({"time_ids": sdxl_time_ids(pipe, len(i), z0.shape[-1] * pipe.vae_scale_factor),
                          "pooled_benign": p_traj[j], "pooled_cf": p_cf[i]} if sdxl else None)
                loss, info = redirect_loss(unet, out_u, out_b, emb[j], z0[i], e_cf[i], alphas, g, WEIGHTS, added)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            if step % 25 == 0:
                log.append({"stage": stage, "step": step, "loss": round(loss.item(), 5),
                            **{k: round(v, 5) for k, v in info.items()}})
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if acc.is_main_process and ((step + 1) % args.ckpt_every == 0 or step + 1 == total):
                save_checkpoint(ckpt, acc.unwrap_model(wrapped), opt, step + 1, log)
        model = acc.unwrap_model(wrapped)
        model.eval()

    if acc.is_main_process:
        metrics.update(_validate_classifier(model, xs, ts, emb, labels, val_idx, args.threshold))
        pooled = (p_u, p_traj[train_idx[benign_pool]], sdxl_time_ids(pipe, 1, z0.shape[-1] * pipe.vae_scale_factor)
                  ) if sdxl else None
        metrics.update(_validate_redirect(model, unet, z0, e_u, emb[train_idx[benign_pool]], alphas, pooled))
        model.save_pretrained(args.out)
        with atomic_path(Path(args.out) / "train_log.json") as tmp:
            tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k != "func"},
                                       "metrics": metrics, "log": log,
                                       "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    return metrics


def _attacked(rows: torch.Tensor, pooled: torch.Tensor | None, pairs: torch.Tensor, adv: tuple, share: float,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ``share`` of the unsafe rows (of pairs with variants) swapped for one of their pair's attack-style variants
    (SDXL: its pooled embedding with it)."""
    emb, emb_pooled, of_pair = adv
    rows = rows.clone()
    pooled = None if pooled is None else pooled.clone()
    for r, k in enumerate(pairs.tolist()):
        if len(of_pair[k]) and torch.rand((), generator=g) < share:
            v = of_pair[k][torch.randint(0, len(of_pair[k]), (), generator=g)]
            rows[r] = emb[v]
            if pooled is not None:
                pooled[r] = emb_pooled[v]
    return rows, pooled


@torch.no_grad()
def _validate_classifier(model, xs, ts, emb, labels, val_idx, threshold) -> dict:
    """Held-out prompts (whole trajectories): accuracy per step and of the first check at step 0."""
    x = xs[val_idx].float()  # (V, S, C, h, w)
    probs = []
    for k in range(x.shape[1]):
        p = torch.softmax(model(x[:, k], ts[k:k + 1], emb[val_idx], part="classify"), -1)[:, 1]
        probs.append(p)
    probs = torch.stack(probs, 1)
    y = labels[val_idx].bool()
    pred = probs >= threshold
    per_step = (pred == y[:, None]).float().mean(0)
    return {"val_prompts": int(len(val_idx)), "val_acc_mean": round(per_step.mean().item(), 4),
            "val_acc_step0": round(per_step[0].item(), 4), "val_acc_per_step": [round(v, 4) for v in per_step.tolist()],
            "val_false_positive_any_step": round(pred[~y].any(1).float().mean().item(), 4),
            "val_miss_all_steps": round((~pred[y].any(1)).float().mean().item(), 4)}


@torch.no_grad()
def _validate_redirect(model, unet, z0, e_u, e_b, alphas, pooled=None, n: int = 64) -> dict:
    """``pooled``: SDXL, (unsafe pooled, benign pooled, time_ids (1, 6))."""
    g = torch.Generator().manual_seed(1234)
    i = torch.arange(min(n, len(z0)))
    out = model.redirect(e_u[i], pooled[0][i] if pooled else None)
    red, mask, scale = out[:3]
    mask_b = model.redirect(e_b[: len(i)], pooled[1][: len(i)] if pooled else None)[1]
    t = torch.randint(0, len(alphas), (len(i),), generator=g)
    noise = torch.randn(z0[i].shape, generator=g)
    from .losses import noised

    def added(p):
        return {"added_cond_kwargs": {"text_embeds": p, "time_ids": pooled[2].expand(len(p), -1)}} if pooled else {}

    z_t = noised(z0[i], noise, t, alphas)
    dm_red = torch.nn.functional.mse_loss(unet(z_t, t, encoder_hidden_states=red,
                                               **added(out[3] if pooled else None)).sample, noise).item()
    dm_orig = torch.nn.functional.mse_loss(unet(z_t, t, encoder_hidden_states=e_u[i],
                                                **added(pooled[0][i] if pooled else None)).sample, noise).item()
    return {"dm_safe_target_redirected": round(dm_red, 5), "dm_safe_target_original": round(dm_orig, 5),
            "mask_mean_unsafe": round(mask.mean().item(), 4), "mask_mean_benign": round(mask_b.mean().item(), 4),
            "scale_mean_unsafe": round(scale.mean().item(), 4)}
