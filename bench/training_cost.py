"""What the prompt-only training recipe (``python -m train data`` + the trainers) costs at real size, on paper.

    python -m bench training-cost [--out bench/results/training_cost.json]

FLOPs are COUNTED, not guessed: ``torch.utils.flop_counter.FlopCounterMode`` over one UNet forward / backward, one
VAE encode / decode and the guards' extra modules, built on the meta device (no weights allocated), with the
explicit attention processor (``AttnProcessor``) the bundles export. The counter counts matmuls and convolutions
(2 FLOPs per multiply-add); norms, softmax and activations are not counted (a few % of a UNet step).

Then, per step of the recipe, the counts of images, UNet calls and FLOPs follow from the trainers' defaults and the
data sizes (:data:`RECIPES`); disk from the arrays the data step writes, calibrated on the real tinyworld folder.
Time: ``hours = FLOPs / (PEAK_H100 * utilisation)`` with utilisation an ASSUMED range (:data:`MFU`), never measured
here (no GPU). The tinyworld run measured on this CPU gives the achieved FLOP/s of each step, a sanity check of
the counting (one model, same code, the same FLOPs per step whatever the hardware).

Writes the JSON (every input with its source) and a markdown table beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _cache_root() -> Path:
    """``.cache`` of this checkout, else of the main checkout this git worktree belongs to (caches are not shared
    between worktrees)."""
    import subprocess

    if (ROOT / ".cache" / "data").is_dir():
        return ROOT / ".cache"
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        return Path(common).parent / ".cache"
    except (OSError, subprocess.CalledProcessError):
        return ROOT / ".cache"


CACHE = _cache_root()
DATA_DIR = CACHE / "data" / "tinyworld"
TRAINED = CACHE / "trained" / "tinyworld"
COMMITTED = ROOT / "models" / "guards" / "tinyworld"
DATASETS = "../shared/datasets"

PEAK_H100 = 989e12
"""H100 SXM dense BF16/FP16 tensor-core peak, FLOP/s (NVIDIA's data sheet, without sparsity)."""
MFU = (0.3, 0.5)
"""ASSUMED model-FLOP utilisation of a diffusion UNet in FP16/BF16 on one H100 (inference and training): an
assumption, not a measurement (no GPU was available to this work). Hours are given at both ends."""

SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816}
"""The published SDXL base 1.0 UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), 2.57 B params."""

SDXL_TEXT = [dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
             dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")]
"""SDXL's two text encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14); SD 1.5 has the first only."""

RECIPES = {
    "tinyworld": {"pairs": 800, "candidates": 4, "benign": 600, "steps": 20, "fewshot": 30,
                  "safeguider_prompts": 7019},
    "sd15": {"pairs": 2000, "candidates": 4, "benign": 1000, "steps": 20, "fewshot": 10,
             "safeguider_prompts": 4703 + 30000},
    "sdxl": {"pairs": 2000, "candidates": 4, "benign": 1000, "steps": 20, "fewshot": 10,
             "safeguider_prompts": 4703 + 30000},
}
"""Data sizes. tinyworld: the measured run (data.json). SD 1.5 / SDXL: 2000 pairs from the 4703 I2P prompts,
1000 COCO-30k benign prompts, 10 few-shot nudity images (one concept), SafeGuider on all of I2P + COCO-30k."""

TRAINER_DEFAULTS = {
    "saferedir": {"gen_steps": 600, "gen_batch": 16, "val": 64},
    "safepatch": {"steps": 700, "batch_size": 32},
    "safectrl": {"feature_draws": 2, "stage2_steps": 1500, "stage2_batch": 16, "mask_timesteps": 3},
    "safeguider": {"variants_per_prompt": 26517 / 7019},
}
"""The trainers' CLI defaults (train/<guard>/cli.py); SafeGuider's variants per prompt (deletion variants + the
prompt, after the split) is the tinyworld log's 26517 train prompts / 7019 prompts."""


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        fn()
    return int(mode.get_total_flops())


def arches() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from export.families.fixtures import SD15_UNET_CONFIG, SD15_VAE_CONFIG

    tw = ROOT / "models" / "tinyworld"
    te = json.loads((tw / "text_encoder" / "config.json").read_text())
    sd15_unet = dict(SD15_UNET_CONFIG)  # the rest: UNet2DConditionModel's defaults (= SD 1.5)
    return {
        "tinyworld": {"unet": dict(UNet2DConditionModel.load_config(tw / "unet")),
                      "vae": dict(AutoencoderKL.load_config(tw / "vae")), "image": 64,
                      "text": [dict(vocab_size=te["vocab_size"], hidden_size=te["hidden_size"],
                                    intermediate_size=te["intermediate_size"],
                                    num_hidden_layers=te["num_hidden_layers"],
                                    num_attention_heads=te["num_attention_heads"],
                                    max_position_embeddings=te["max_position_embeddings"])],
                      "source": "models/tinyworld/{unet,vae,text_encoder}/config.json"},
        "sd15": {"unet": sd15_unet, "vae": dict(SD15_VAE_CONFIG), "image": 512, "text": SDXL_TEXT[:1],
                 "source": "export/families/fixtures.py SD15_UNET_CONFIG / SD15_VAE_CONFIG (make_sd15_architecture)"},
        "sdxl": {"unet": dict(SDXL_UNET_CONFIG), "vae": {**SD15_VAE_CONFIG, "sample_size": 1024}, "image": 1024,
                 "text": SDXL_TEXT, "source": "bench/training_cost.py SDXL_UNET_CONFIG (published SDXL base); "
                                              "VAE = SD's architecture at 1024 px"},
    }


def _meta_unet(cfg: dict):
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    unet.set_attn_processor(AttnProcessor())
    return unet


def unet_inputs(unet, batch: int, text_len: int, device="meta") -> tuple:
    import torch

    c = unet.config
    h = c.sample_size
    x = torch.randn(batch, c.in_channels, h, h, device=device)
    t = torch.full((batch,), 500.0, device=device)
    e = torch.randn(batch, text_len, c.cross_attention_dim, device=device)
    kw = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device),
                                   "time_ids": torch.randn(batch, 6, device=device)}
    return x, t, e, kw


def unet_forward_flops(unet, batch: int = 1, text_len: int = 77, device="meta") -> int:
    import torch

    x, t, e, kw = unet_inputs(unet, batch, text_len, device)
    with torch.no_grad():
        return _count(lambda: unet(x, t, encoder_hidden_states=e, **kw))


def _backward_flops(unet, text_len, *, weights: bool, emb: bool, params=()) -> int:
    unet.requires_grad_(weights)
    for p in params:
        p.requires_grad_(True)
    x, t, e, kw = unet_inputs(unet, 1, text_len)
    e.requires_grad_(emb)
    out = unet(x, t, encoder_hidden_states=e, **kw).sample
    flops = _count(lambda: out.float().pow(2).mean().backward())
    unet.requires_grad_(False)
    return flops


def _partial_forward_flops(unet, text_len) -> tuple[int, str]:
    """SafeCtrl's detector features: the UNet up to its first cross-attention layer (train/safectrl/train.py)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    name, attn = next((n, m) for n, m in unet.named_modules() if n.endswith(".attn2"))

    class Stop(Exception):
        pass

    def hook(*_):
        raise Stop

    handle = attn.register_forward_pre_hook(hook)
    x, t, e, kw = unet_inputs(unet, 1, text_len)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as mode:
            try:
                unet(x, t, encoder_hidden_states=e, **kw)
            except Stop:
                pass
    finally:
        handle.remove()
    return int(mode.get_total_flops()), name


def _safepatch_step_flops(unet, text_len, text_dim) -> dict:
    """One SafePatch training example: the patch (encoder clone) forward, the frozen UNet forward with its residuals,
    the backward (patch weights trained, UNet frozen: activation gradients only)."""
    import torch

    from guards.safepatch import SafePatch, SafePatchConfig

    with torch.device("meta"):
        patch = SafePatch(SafePatchConfig.for_unet(unet, text_dim))
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for m in patch.modules():
        if isinstance(m, Attention):
            m.set_processor(AttnProcessor())
    unet.requires_grad_(False)
    x, t, e, kw = unet_inputs(unet, 1, text_len)
    s = torch.randn(1, 8, text_dim, device="meta")
    box = {}

    def fwd_patch():
        box["res"] = patch(x, t, e, s)

    def fwd_unet():
        res = box["res"]
        box["out"] = unet(x, t, encoder_hidden_states=e, down_block_additional_residuals=tuple(res[:-1]),
                          mid_block_additional_residual=res[-1], **kw).sample

    f_patch = _count(fwd_patch)
    f_unet = _count(fwd_unet)
    bwd = _count(lambda: box["out"].float().pow(2).mean().backward())
    return {"patch_forward": f_patch, "unet_forward_with_residuals": f_unet, "backward": bwd,
            "step": f_patch + f_unet + bwd, "patch_params": sum(p.numel() for p in patch.parameters())}


def _vae_flops(cfg: dict) -> dict:
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    vae.set_attn_processor(AttnProcessor())
    n = cfg["sample_size"]
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    img = torch.randn(1, 3, n, n, device="meta")
    lat = torch.randn(1, cfg["latent_channels"], n // f, n // f, device="meta")
    with torch.no_grad():
        return {"encode": _count(lambda: vae.encode(img)), "decode": _count(lambda: vae.decode(lat)),
                "latent": [cfg["latent_channels"], n // f, n // f]}


def _text_flops(cfgs: list) -> int:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    total = 0
    for cfg in cfgs:
        with torch.device("meta"):
            te = CLIPTextModel(CLIPTextConfig(**cfg))
        ids = torch.zeros(1, cfg["max_position_embeddings"], dtype=torch.long, device="meta")
        with torch.no_grad():
            total += _count(lambda: te(ids))
    return total


def model_costs(arch: dict) -> dict:
    """Counted FLOPs of one batch-1 call of every module the recipe runs, for one architecture."""
    unet = _meta_unet(arch["unet"])
    text_len = arch["text"][0]["max_position_embeddings"]
    text_dim = arch["text"][0]["hidden_size"]
    fwd = unet_forward_flops(unet, 1, text_len)
    fwd2 = unet_forward_flops(unet, 2, text_len)
    partial, detect = _partial_forward_flops(unet, text_len)
    blend = [m for n, m in unet.named_modules() if n.startswith("up_blocks.1.") and n.endswith(".attn2")]
    costs = {
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "text_len": text_len,
        "unet_forward": fwd,
        "unet_forward_batch2": fwd2,
        "unet_backward_full": _backward_flops(unet, text_len, weights=True, emb=False),
        "unet_backward_to_embedding": _backward_flops(unet, text_len, weights=False, emb=True),
        "unet_backward_to_up_blocks_1_attn2_kv": _backward_flops(
            unet, text_len, weights=False, emb=False,
            params=[p for m in blend for p in (*m.to_k.parameters(), *m.to_v.parameters())]),
        "unet_partial_to_first_attn2": partial,
        "first_attn2": detect,
        "vae": _vae_flops(arch["vae"]),
        "text_encoders_forward": _text_flops(arch["text"]),
    }
    try:
        costs["safepatch"] = _safepatch_step_flops(unet, text_len, text_dim)
        costs["safepatch"]["method"] = "counted: guards.safepatch.SafePatch on meta"
    except Exception as err:  # noqa: BLE001 -- the ratio measured on SD 1.5 stands in, said so
        r = 0.1652
        costs["safepatch"] = {"patch_forward": int(r * 2 * fwd), "unet_forward_with_residuals": fwd,
                              "backward": int(r * 2 * fwd) * 2 + costs["unet_backward_to_embedding"],
                              "method": f"ratio 0.1652 of a CFG step (latency_sd15_random_256_safepatch_flops.json); "
                                        f"counting failed: {type(err).__name__}: {err}"}
        c = costs["safepatch"]
        c["step"] = c["patch_forward"] + c["unet_forward_with_residuals"] + c["backward"]
    return costs


# ---------------------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------------------

def data_step(c: dict, r: dict, image: int) -> dict:
    """``python -m train data``: per pair 1 + K images, per benign prompt 1; CFG = 2 batch-1 UNet calls per
    sampling step; one VAE decode per image; the judge, text encoder and scheduler are not counted."""
    images = r["pairs"] * (1 + r["candidates"]) + r["benign"]
    calls = 2 * r["steps"] * images
    ch, h, w = c["vae"]["latent"]
    traj = r["steps"] * ch * h * w * 2
    px = image * image
    disk = r["pairs"] * (2 * px * 3 + px + traj) + r["benign"] * (px * 3 + traj)
    return {"images": images, "unet_calls": calls, "pipeline_calls_batch2": calls // 2,
            "flops": calls * c["unet_forward"] + images * c["vae"]["decode"], "disk_model_bytes": disk,
            "trajectory_bytes_per_prompt": traj}


def trainers(c: dict, r: dict, keep_rate: float, overrides: dict | None = None) -> dict:
    """Per trainer: UNet calls (batch-1 forwards) and counted FLOPs at the CLI defaults (``overrides``: the run
    measured on tinyworld)."""
    from train.safectrl.train import auto_fewshot_draws

    o = overrides or {}
    kept = round(r["pairs"] * keep_rate)
    f, enc = c["unet_forward"], c["vae"]["encode"]
    out = {}
    sr = {**TRAINER_DEFAULTS["saferedir"], **o.get("saferedir", {})}
    n = sr["gen_steps"] * sr["gen_batch"]
    out["saferedir"] = {
        "unet_calls": 2 * n + 2 * sr["val"], "vae_encodes": kept,
        "flops": n * (2 * f + c["unet_backward_to_embedding"]) + 2 * sr["val"] * f + kept * enc,
        "what": f"stage 2: {sr['gen_steps']} steps x {sr['gen_batch']} unsafe: UNet forward + backward to the "
                "redirected embedding + kd teacher forward; VAE encode of the kept safe images; stage 1 (the "
                "latent classifier on stored trajectories) runs no UNet and is not counted"}
    sp = {**TRAINER_DEFAULTS["safepatch"], **o.get("safepatch", {})}
    n = sp["steps"] * sp["batch_size"]
    out["safepatch"] = {
        "unet_calls": n, "vae_encodes": kept + r["benign"],
        "flops": n * c["safepatch"]["step"] + (kept + r["benign"]) * enc,
        "what": f"{sp['steps']} steps x {sp['batch_size']} examples: patch (encoder clone) forward + UNet forward "
                "with its residuals + backward (patch weights, UNet activations); VAE encode of the kept safe and "
                "the benign images"}
    sc = {**TRAINER_DEFAULTS["safectrl"], **o.get("safectrl", {})}
    neg = kept + r["benign"]
    fs = auto_fewshot_draws(r["fewshot"], neg, sc["feature_draws"])
    feats = neg * sc["feature_draws"] + r["fewshot"] * fs
    partial = feats + 2 * sc["mask_timesteps"] * kept
    n = sc["stage2_steps"] * sc["stage2_batch"] * 2
    stage2 = n * (2 * f + c["unet_backward_to_up_blocks_1_attn2_kv"])
    out["safectrl"] = {
        "unet_calls": 2 * n, "partial_unet_calls": partial, "vae_encodes": 2 * kept + r["benign"] + r["fewshot"],
        "stage2_flops": stage2,
        "flops": stage2 + partial * c["unet_partial_to_first_attn2"] + (2 * kept + r["benign"] + r["fewshot"]) * enc,
        "stage1_feature_rows": feats,
        "what": f"stage 1 features: {feats} partial UNet forwards (to the first cross-attention), detector blend + "
                f"mask check {2 * sc['mask_timesteps']} x kept pairs; stage 2: {sc['stage2_steps']} steps x "
                f"{sc['stage2_batch']} pairs x 2 (preferred + rejected): reference forward + forward + backward to "
                "up_blocks.1's attention K/V (the Safety Guidance weights); the blend's second attention not counted"}
    sg = TRAINER_DEFAULTS["safeguider"]
    prompts = round(r["safeguider_prompts"] * sg["variants_per_prompt"])
    out["safeguider"] = {"unet_calls": 0, "text_encodes": prompts, "flops": prompts * c["text_encoders_forward"],
                         "what": "one text-encoder forward per training prompt (deletion variants included); "
                                 "the classifier on the stored embeddings is not counted"}
    return out


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def tinyworld_measured() -> dict:
    """The timings this CPU measured, each with its file."""
    m = {}
    d = _json(DATA_DIR / "data.json")
    if d:
        m["data"] = {"source": str(DATA_DIR / "data.json"), "counts": d["counts"], "steps": d["steps"],
                     "seconds": d["seconds"]["generate"] + d["seconds"]["benign_generate"],
                     "seconds_all": d["seconds"], "disk_bytes": _du(DATA_DIR),
                     "disk_source": f"sum of file sizes under {DATA_DIR} (du -sb)"}
    else:
        m["data"] = {"source": "recorded 2026-12-03 from .cache/data/tinyworld (folder absent now)",
                     "counts": {"pairs": 800, "kept": 767, "benign": 600, "candidates": 3200}, "steps": 20,
                     "seconds": 1895.036 + 167.302, "disk_bytes": 89729489}
    for guard in ("saferedir", "safepatch", "safectrl", "safeguider"):
        for root, kind in ((TRAINED, "recipe (--data .cache/data/tinyworld)"), (COMMITTED, "renderer-trained")):
            log = _json(root / guard / "train_log.json")
            if log:
                m[guard] = {"source": str(root / guard / "train_log.json"), "kind": kind, "log": log}
                break
    return m


def _trainer_timing(guard: str, log: dict, source: str) -> tuple[float, dict]:
    """(seconds of the UNet-bound part, the run's settings) of a train_log.json."""
    if guard == "saferedir":
        a = log["args"]
        # whole run: data + stage 1 (classifier, not counted) + stage 2
        return float(log["seconds"]), {"gen_steps": int(a["gen_steps"]), "gen_batch": int(a["gen_batch"])}
    if guard == "safepatch":
        last = log["patch"][-1]
        cfg = _json(Path(source).parent / "config.json") or {}
        bs = int((cfg.get("training") or {}).get("batch_size", TRAINER_DEFAULTS["safepatch"]["batch_size"]))
        return float(last["seconds"]), {"steps": int(last["step"]), "batch_size": bs}
    if guard == "safectrl":
        a = log["args"]
        return float(log["timings"]["stage2_train_s"]), {"stage2_steps": int(a["stage2_steps"]),
                                                         "stage2_batch": int(a["stage2_batch"])}
    return float(log["seconds"]), {}


def hours(flops: float) -> list[float]:
    """[best, worst] H100 hours at the assumed utilisation range."""
    return [flops / (PEAK_H100 * u) / 3600 for u in (MFU[1], MFU[0])]


def run(out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    models = {name: {**{k: v for k, v in a.items() if k in ("image", "source")}, "costs": model_costs(a)}
              for name, a in arches().items()}
    measured = tinyworld_measured()
    md = measured["data"]
    tw = models["tinyworld"]["costs"]
    tw_data = data_step(tw, RECIPES["tinyworld"], 64)
    disk_factor = md["disk_bytes"] / tw_data["disk_model_bytes"]
    keep_tw = md["counts"]["kept"] / md["counts"]["pairs"]
    check = {"data": {"flops": tw_data["flops"], "seconds": md["seconds"],
                      "achieved_flops_per_s": tw_data["flops"] / md["seconds"],
                      "images_model": tw_data["images"],
                      "images_measured": md["counts"]["pairs"] + md["counts"]["candidates"] + md["counts"]["benign"],
                      "disk_model_bytes": tw_data["disk_model_bytes"], "disk_measured_bytes": md["disk_bytes"],
                      "disk_factor": disk_factor, "source": md["source"]}}
    overrides = {}
    for guard in ("saferedir", "safepatch", "safectrl"):
        if guard in measured:
            secs, settings = _trainer_timing(guard, measured[guard]["log"], measured[guard]["source"])
            overrides[guard] = settings
            check[guard] = {"seconds": secs, "settings": settings, "source": measured[guard]["source"],
                            "kind": measured[guard]["kind"]}
    tw_train = trainers(tw, RECIPES["tinyworld"], keep_tw, overrides)
    for guard in ("saferedir", "safepatch", "safectrl"):
        if guard in check:
            fl = tw_train[guard]["stage2_flops"] if guard == "safectrl" else tw_train[guard]["flops"]
            check[guard].update(flops=fl, achieved_flops_per_s=fl / check[guard]["seconds"])
    if "safeguider" in measured:
        check["safeguider"] = {"seconds": measured["safeguider"]["log"].get("seconds"),
                               "source": measured["safeguider"]["source"]}
    steps = {}
    for name in ("tinyworld", "sd15", "sdxl"):
        c, r, image = models[name]["costs"], RECIPES[name], models[name]["image"]
        keep = keep_tw if name == "tinyworld" else 1.0
        d = data_step(c, r, image)
        d["disk_bytes"] = int(d["disk_model_bytes"] * disk_factor)
        d["h100_hours"] = hours(d["flops"])
        t = trainers(c, r, keep)
        for v in t.values():
            v["h100_hours"] = hours(v["flops"])
        steps[name] = {"recipe": r, "keep_rate": keep, "data": d, **t}
    result = {
        "what": __doc__.splitlines()[0],
        "method": {"flops": "torch.utils.flop_counter.FlopCounterMode on the meta device, AttnProcessor (explicit "
                            "attention, as exported); matmul/conv FLOPs (2 per MAC); batch-1 counts x calls",
                   "time": f"hours = FLOPs / ({PEAK_H100:.3g} FLOP/s H100 dense FP16/BF16 peak x utilisation); "
                           f"utilisation {MFU[0]}-{MFU[1]} is an ASSUMPTION (typical MFU of diffusion UNets in "
                           "FP16), not measured here",
                   "disk": "data step: unsafe + safe images u8 HxWx3 + mask u8 HxW per pair, image per benign "
                           "prompt, trajectory S*C*h*w*2 bytes per unsafe and benign prompt; x the factor "
                           "measured / modelled of the tinyworld folder (npz headers, jsonl, few-shot set)",
                   "keep_rate": "tinyworld: measured (data.json kept/pairs); SD: 1.0 (upper bound: every pair kept)",
                   "not_counted": "judge (tinyworld: 4.4 s of 2067 s measured), text encoders in the data step, "
                                  "scheduler, optimizer; norms/softmax/activations"},
        "inputs": {"peak_h100_flops": PEAK_H100, "peak_source": "NVIDIA H100 SXM data sheet, dense FP16/BF16",
                   "mfu_assumed": MFU, "recipes": RECIPES, "trainer_defaults": TRAINER_DEFAULTS,
                   "tinyworld_measured": {k: {kk: vv for kk, vv in v.items() if kk != "log"}
                                          for k, v in measured.items()}},
        "models": models,
        "tinyworld_check": check,
        "steps": steps,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=list) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    return result


def commands() -> dict:
    common = (f"--prompts {DATASETS}/i2p_unsafe_prompts_4703.csv --rules nudity_rules.csv "
              f"--benign {DATASETS}/coco_30k_prompts.csv --judge nudenet --masks fewshot_nudity/ "
              "--limit 2000 --benign-limit 1000 --candidates 4 --steps 20")
    out = {}
    for name, model in (("sd15", "models/sd15"), ("sdxl", "models/sdxl-base")):
        out[name] = [f"python -m train data --model {model} --out .cache/data/{name} {common}",
                     f"python -m train saferedir --model {model} --data .cache/data/{name} --out guards_{name}/saferedir",
                     f"python -m train safepatch --model {model} --data .cache/data/{name} --out guards_{name}/safepatch",
                     f"python -m train safectrl --model {model} --data .cache/data/{name} --out guards_{name}/safectrl",
                     f"python -m train safeguider --model {model} --i2p {DATASETS}/i2p_unsafe_prompts_4703.csv "
                     f"--coco {DATASETS}/coco_30k_prompts.csv --out guards_{name}/safeguider"]
    return out


def markdown(res: dict) -> str:
    def pf(x):
        return f"{x / 1e15:,.1f}" if x >= 1e14 else f"{x / 1e15:.3g}"

    lines = ["# Training cost of the prompt-only recipe at real size (on paper)", "",
             "Written by `python -m bench training-cost` (`bench/training_cost.py`); all figures and their sources "
             "in `training_cost.json`.", "",
             "- **FLOPs: counted** (`FlopCounterMode`, meta device, explicit attention as exported) per batch-1 "
             "call x the calls each step makes at its CLI defaults.",
             f"- **H100 hours: FLOPs / ({PEAK_H100 / 1e12:.0f} TFLOP/s dense FP16/BF16 peak x utilisation)**, "
             f"utilisation **{MFU[0]}-{MFU[1]} ASSUMED** (typical for diffusion UNets in FP16; not measured: no GPU "
             "here). The range is `at 0.5 - at 0.3`.",
             "- Disk: the data folder's arrays (images u8, masks, float16 trajectories), x the measured/modelled "
             f"factor of the real tinyworld folder ({res['tinyworld_check']['data']['disk_factor']:.3f}). Trainer "
             "caches not included.",
             "- SD 1.5 / SDXL: 2000 pairs from the 4703 I2P prompts, K=4 candidates, 1000 COCO-30k benign prompts, "
             "20 steps; every pair counted as kept (upper bound).", ""]
    for name, title in (("sd15", "SD 1.5, 512 px"), ("sdxl", "SDXL base, 1024 px")):
        m = res["models"][name]["costs"]
        lines += [f"## {title}", "", "```sh"] + commands()[name] + ["```", "",
                  f"UNet {m['unet_params'] / 1e9:.2f} B params; one UNet forward (batch 1) = "
                  f"{m['unet_forward'] / 1e12:.3f} TFLOP, VAE decode {m['vae']['decode'] / 1e12:.3f} TFLOP, "
                  f"VAE encode {m['vae']['encode'] / 1e12:.3f} TFLOP.", "",
                  "| step | images | UNet calls (batch-1 fwd) | PFLOP | disk GB | H100 hours (MFU 0.5 - 0.3) |",
                  "|---|---:|---:|---:|---:|---:|"]
        s = res["steps"][name]
        total = 0.0
        for step in ("data", "saferedir", "safepatch", "safectrl", "safeguider"):
            v = s[step]
            total += v["flops"]
            img = f"{v['images']:,}" if step == "data" else "0"
            disk = f"{v['disk_bytes'] / 1e9:.1f}" if step == "data" else "-"
            h = v["h100_hours"]
            lines.append(f"| {step} | {img} | {v['unet_calls']:,} | {pf(v['flops'])} | {disk} | "
                         f"{h[0]:.3g} - {h[1]:.3g} |")
        h = hours(total)
        lines += [f"| **all** | | | {pf(total)} | | **{h[0]:.3g} - {h[1]:.3g}** |", ""]
    lines += ["What each trainer row counts:", ""]
    for step in ("saferedir", "safepatch", "safectrl", "safeguider"):
        lines.append(f"- {step}: {res['steps']['sd15'][step]['what']}.")
    c = res["tinyworld_check"]
    lines += ["", "## Check against tinyworld (measured on this CPU, 1 thread)", "",
              "The same model on the tinyworld run: counted FLOPs / measured seconds = achieved FLOP/s. A "
              "consistent order of magnitude across steps says the counting covers the work.", "",
              "| step | counted GFLOP | measured s | achieved GFLOP/s | source |", "|---|---:|---:|---:|---|"]
    for step, v in c.items():
        if "flops" in v:
            lines.append(f"| {step}{' (stage 2)' if step == 'safectrl' else ''} | {v['flops'] / 1e9:,.0f} | "
                         f"{v['seconds']:.0f} | {v['achieved_flops_per_s'] / 1e9:.2f} | "
                         f"`{os.path.relpath(v['source'], ROOT)}`{' (' + v['kind'] + ')' if 'kind' in v else ''} |")
    d = c["data"]
    lines += ["", f"Data step: {d['images_model']:,} images modelled vs {d['images_measured']:,} generated; disk "
                  f"{d['disk_model_bytes'] / 1e6:.1f} MB modelled vs {d['disk_measured_bytes'] / 1e6:.1f} MB measured.",
              ""]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("training-cost", help="FLOPs, disk and H100 hours of the training recipe at real size")
    p.add_argument("--out", type=Path, default=Path("bench/results/training_cost.json"))
    p.set_defaults(func=lambda a: (run(a.out), 0)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_cost")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["training-cost", *(argv or [])])
    return int(args.func(args) or 0)
