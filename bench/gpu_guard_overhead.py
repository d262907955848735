"""Each guard's cost against the plain UNet step at real size: torch fp16, CUDA graphs, one GPU, random weights.

    python -m bench gpu-overhead [--arch sd15 sdxl] [--iters 20] --out bench/results/gpu_guard_overhead_h200.json

The real SD 1.5 (512 px) and SDXL base (1024 px) architectures with random weights (no hub), classifier-free
guidance (batch 2: the unconditional and the conditional row), each guard built at the backbone's size as the
trainers build it, untrained (its cost does not depend on its weights). Each timed call is captured once in a
``torch.cuda.CUDAGraph`` after warm-up calls and replayed; the figure is the median of ``--iters`` replays timed
with CUDA events, all in one run, so every ratio divides two numbers from the same process and GPU state.

What is timed, per denoising step unless said otherwise (rows of the JSON ``timings``):

- ``unet``: the plain UNet, batch 2;
- ``safepatch``: the gate fired: the patch (encoder clone) on the conditional row + the UNet with its residuals;
- ``safectrl_idle_<layers>`` / ``safectrl_active_<layers>``: the UNet with the Safety Guidance processors on the
  blended attn2 layers (``all``: every attn2, as published; ``up1``: ``up_blocks.1`` only, tinyworld's choice) and
  the Unsafe Attention Block on the detect layer's features; idle = blend weight absent (the stock attention),
  active = blend weight 1 everywhere (both key sets attended on every blended layer);
- ``saferedir_check``: the latent-aware classifier on the conditional row (runs every ``check_every`` steps);
  ``saferedir_redirect``: the token redirection, once per image when it fires;
- ``text_b1`` / ``text_b64``: the text encoder(s) at batch 1 (every prompt, not a guard cost) and 64 (one call of
  SafeGuider's beam search, which rewrites a flagged prompt in at most ``max_depth`` such calls), each with the
  SafeGuider classifier on the EOS embedding(s).

FLOPs (``flops``) are counted on the meta device with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
convolutions, 2 per multiply-add) for the same calls, so the timings can be read against them. ``--device cpu
--arch tiny`` runs the same code on a tiny UNet without graphs (the test suite's smoke test).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

STEPS = 30
"""Denoising steps of the per-image estimates (the SDXL pipeline's usual 30; SD 1.5's 50 gives smaller shares)."""

SAFEREDIR_CHECK_EVERY = 5
SAFEGUIDER_SEARCH_BATCH = 64
TINY_UNET = {"sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64),
             "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 48,
             "attention_head_dim": 4, "norm_num_groups": 8}
TINY_TEXT = [dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu")]


def architectures() -> dict:
    from bench.training_cost import SDXL_TEXT, SDXL_UNET_CONFIG
    from export.families.fixtures import SD15_UNET_CONFIG

    return {"sd15": {"unet": dict(SD15_UNET_CONFIG), "image": 512, "text": SDXL_TEXT[:1]},
            "sdxl": {"unet": dict(SDXL_UNET_CONFIG), "image": 1024, "text": SDXL_TEXT},
            "tiny": {"unet": dict(TINY_UNET), "image": 128, "text": TINY_TEXT}}


class Parts:
    """The backbone and every guard at one architecture's size, on one device and dtype."""

    def __init__(self, arch: dict, device: str, dtype: torch.dtype):
        import torch

        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from guards.safeguider import SafeGuiderClassifier, SafeGuiderConfig
        from guards.safepatch import SafePatch, SafePatchConfig
        from guards.saferedir import SafeRedir, SafeRedirConfig

        torch.manual_seed(0)
        with torch.device(device):
            self.unet = UNet2DConditionModel.from_config(arch["unet"]).eval()
            texts = arch["text"]
            self.text_encoders = [
                (CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**cfg, projection_dim=1280))
                .eval() for i, cfg in enumerate(texts)]
            c = self.unet.config
            self.width = c.cross_attention_dim
            self.patch = SafePatch.from_unet(self.unet, SafePatchConfig.for_unet(self.unet, self.width)).eval()
            self.saferedir = SafeRedir(SafeRedirConfig(hidden_size=self.width, max_length=texts[0][
                "max_position_embeddings"], latent_channels=c.in_channels)).eval()
            # SDXL: one classifier over both encoders' EOS embeddings concatenated (export/guards/safeguider.py)
            self.safeguider = SafeGuiderClassifier(SafeGuiderConfig(
                hidden_size=sum(t["hidden_size"] for t in texts))).eval()
        for m in (self.unet, self.patch, self.saferedir, self.safeguider, *self.text_encoders):
            m.to(dtype)
        self.device, self.dtype, self.arch = device, dtype, arch
        self.stock = dict(self.unet.attn_processors)
        g = None if device == "meta" else torch.Generator(device=device).manual_seed(1)
        h = c.sample_size
        length = texts[0]["max_position_embeddings"]
        self.x = torch.randn(2, c.in_channels, h, h, generator=g, device=device, dtype=dtype)
        self.t = torch.full((2,), 500.0, device=device)
        self.e = torch.randn(2, length, self.width, generator=g, device=device, dtype=dtype)
        self.instruction = torch.randn(1, length, self.width, generator=g, device=device, dtype=dtype)
        self.added = {}
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            self.added = {"added_cond_kwargs": {
                "text_embeds": torch.randn(2, pooled, generator=g, device=device, dtype=dtype),
                "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype)}}
        self.ids = {b: torch.randint(0, texts[0]["vocab_size"], (b, length), generator=g, device=device)
                    for b in (1, SAFEGUIDER_SEARCH_BATCH)}

    def cond_added(self) -> dict:
        return {"added_cond_kwargs": {k: v[1:] for k, v in self.added["added_cond_kwargs"].items()}} \
            if self.added else {}

    # -- the timed calls --------------------------------------------------------------------------------------
    def unet_step(self):
        return self.unet(self.x, self.t, encoder_hidden_states=self.e, **self.added).sample

    def safepatch_step(self):
        import torch

        res = self.patch(self.x[1:], self.t[1:], self.e[1:], self.instruction, **self.cond_added())
        res = [torch.cat([torch.zeros_like(r), r]) for r in res]   # the unconditional row unpatched (apply_uncond)
        return self.unet(self.x, self.t, encoder_hidden_states=self.e, down_block_additional_residuals=res[:-1],
                         mid_block_additional_residual=res[-1], **self.added).sample

    def safectrl(self, layers: str):
        """A SafeCtrl on this UNet blending ``layers`` ("all" | "up1"), and its step function."""
        import torch

        from guards.safectrl import SafeCtrl, SafeCtrlConfig

        cross = [n for n in self.stock if ".attn2." in n]
        blend = cross if layers == "all" else [n for n in cross if n.startswith("up_blocks.1.")]
        attn = dict(self.unet.named_modules())[SafeCtrlConfig.detect_layer.rsplit(".processor", 1)[0]]
        with torch.device(self.device):
            sc = SafeCtrl.for_unet(self.unet, feature_dim=attn.to_q.in_features + attn.to_v.out_features,
                                   blend_layers=blend).eval().to(self.dtype)
        h = self.unet.config.sample_size
        ones = torch.ones(2, 1, h, h, device=self.device, dtype=self.dtype)

        def step(active: bool):
            def run():
                sc.state.reset()
                sc.state.blend = ones if active else None
                out = self.unet(self.x, self.t, encoder_hidden_states=self.e, **self.added).sample
                side = int(round(sc.state.features.shape[1] ** 0.5))
                _, mask = sc.detect(sc.state.features, (side, side), (h, h))
                return out, mask
            return run
        return sc, step, len(blend)

    def saferedir_check(self):
        return self.saferedir.classify(self.x[1:], self.t[1:], self.e[1:])

    def saferedir_redirect(self):
        return self.saferedir.redirect(self.e[1:])[0]

    def text(self, batch: int):
        def run():
            import torch

            ids = self.ids[batch]   # the EOS row's position does not change the cost: the last one stands in
            eos = [te(ids).last_hidden_state[:, -1] for te in self.text_encoders]
            return self.safeguider.safe_score(torch.cat(eos, dim=-1))
        return run


def _graphed(fn, use_graphs: bool):
    """``fn`` captured in a CUDA graph after warm-up calls on a side stream (torch's recipe); its replay."""
    import torch

    if not use_graphs:
        return fn, "eager"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 -- recorded: the row is then timed eagerly, said so in the JSON
        torch.cuda.synchronize()
        return fn, f"eager (capture failed: {type(err).__name__}: {str(err).splitlines()[0][:160]})"
    return graph.replay, "cuda graph"


def _time_ms(run, iters: int, cuda: bool) -> list[float]:
    import torch

    for _ in range(3):
        run()
    out = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            run()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        fn()
    return int(mode.get_total_flops())


def count_flops(arch: dict) -> dict:
    """The same calls on the meta device (no weights allocated), counted."""
    import torch

    parts = Parts(arch, "meta", torch.float32)
    flops = {"unet": _flops(parts.unet_step), "safepatch": _flops(parts.safepatch_step),
             "saferedir_check": _flops(parts.saferedir_check), "saferedir_redirect": _flops(parts.saferedir_redirect),
             "text_b1": _flops(parts.text(1))}
    flops["text_b64"] = SAFEGUIDER_SEARCH_BATCH * flops["text_b1"]  # linear in the batch; spares the meta count
    for layers in ("all", "up1"):
        sc, step, _ = parts.safectrl(layers)
        sc.install(parts.unet)
        flops[f"safectrl_idle_{layers}"] = _flops(step(False))
        flops[f"safectrl_active_{layers}"] = _flops(step(True))
        parts.unet.set_attn_processor(dict(parts.stock))
    return flops


def measure(name: str, arch: dict, device: str, iters: int) -> dict:
    import torch

    cuda = device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    t0 = time.perf_counter()
    parts = Parts(arch, device, dtype)
    timings, methods, blended = {}, {}, {}

    def timed(key, fn):
        run, methods[key] = _graphed(fn, cuda)
        ms = _time_ms(run, iters, cuda)
        timings[key] = {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms)}
        print(f"  {name} {key}: {timings[key]['median_ms']:.3f} ms ({methods[key]})", flush=True)

    with torch.inference_mode():
        timed("unet", parts.unet_step)
        timed("safepatch", parts.safepatch_step)
        for layers in ("all", "up1"):
            sc, step, blended[layers] = parts.safectrl(layers)
            sc.install(parts.unet)
            timed(f"safectrl_idle_{layers}", step(False))
            timed(f"safectrl_active_{layers}", step(True))
            parts.unet.set_attn_processor(dict(parts.stock))
        timed("unet_again", parts.unet_step)   # the baseline once more: drift between the first and last rows
        timed("saferedir_check", parts.saferedir_check)
        timed("saferedir_redirect", parts.saferedir_redirect)
        timed("text_b1", parts.text(1))
        timed(f"text_b{SAFEGUIDER_SEARCH_BATCH}", parts.text(SAFEGUIDER_SEARCH_BATCH))
    params = {"unet": sum(p.numel() for p in parts.unet.parameters()),
              "safepatch": sum(p.numel() for p in parts.patch.parameters()),
              "saferedir": sum(p.numel() for p in parts.saferedir.parameters()),
              "safeguider": sum(p.numel() for p in parts.safeguider.parameters())}
    del parts
    if cuda:
        torch.cuda.empty_cache()
    return {"image": arch["image"], "latent": arch["unet"]["sample_size"], "timings": timings, "methods": methods,
            "blended_attn2_layers": blended, "params": params, "seconds": time.perf_counter() - t0}


def ratios(r: dict) -> dict:
    """Per-step cost of each guard in plain-UNet steps (same run), and per image at :data:`STEPS` steps."""
    t = {k: v["median_ms"] for k, v in r["timings"].items()}
    unet = t["unet"]
    out = {"safepatch_fired_per_step": t["safepatch"] / unet,
           "saferedir_per_step": 1 + t["saferedir_check"] / SAFEREDIR_CHECK_EVERY / unet,
           "saferedir_redirect_in_steps": t["saferedir_redirect"] / unet,
           "safeguider_search_call_in_steps": t[f"text_b{SAFEGUIDER_SEARCH_BATCH}"] / unet,
           "text_b1_in_steps": t["text_b1"] / unet,
           "unet_drift": t["unet_again"] / unet}
    for layers in ("all", "up1"):
        out[f"safectrl_idle_{layers}_per_step"] = t[f"safectrl_idle_{layers}"] / unet
        out[f"safectrl_active_{layers}_per_step"] = t[f"safectrl_active_{layers}"] / unet
    return out


def markdown(res: dict) -> str:
    lines = [f"# Guard cost against the plain UNet on {res['machine']['gpu']} ({res['mode']})", "",
             f"`{res['command']}` ({res['date']}; torch {res['machine']['torch']}, CUDA {res['machine']['cuda']}). "
             "Random weights at the architectures' sizes, batch 2 (CFG); median of "
             f"{res['iters']} timed calls per row, all rows in one run. Ratios: the row's time over the plain UNet "
             "step's in the same run.", "",
             "| arch | UNet step ms | SafePatch fired | SafeCtrl idle (all / up1) | SafeCtrl active (all / up1) | "
             "SafeRedir per step | SafeGuider search call (b64) in steps | UNet drift |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["archs"].items():
        if "error" in r:
            lines.append(f"| {name} {r['image']} px | failed: {r['error']} | | | | | | |")
            continue
        q = r["ratios"]
        lines.append(
            f"| {name} {r['image']} px | {r['timings']['unet']['median_ms']:.2f} | {q['safepatch_fired_per_step']:.3f} "
            f"| {q['safectrl_idle_all_per_step']:.3f} / {q['safectrl_idle_up1_per_step']:.3f} "
            f"| {q['safectrl_active_all_per_step']:.3f} / {q['safectrl_active_up1_per_step']:.3f} "
            f"| {q['saferedir_per_step']:.4f} | {q['safeguider_search_call_in_steps']:.3f} | {q['unet_drift']:.3f} |")
    lines += ["", "FLOPs counted (FlopCounterMode, meta device), GFLOP per call, and the achieved TFLOP/s:", "",
              "| arch | call | GFLOP | ms | TFLOP/s | timed as |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in res["archs"].items():
        for key, f in r.get("flops", {}).items():
            ms = r["timings"][key]["median_ms"]
            lines.append(f"| {name} | {key} | {f / 1e9:.1f} | {ms:.3f} | {f / ms / 1e9:.1f} | {r['methods'][key]} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("safepatch_fired_per_step", "SafePatch fired"), ("safectrl_idle_all_per_step", "SafeCtrl idle (all)"),
            ("safectrl_active_all_per_step", "SafeCtrl active (all)"),
            ("safectrl_active_up1_per_step", "SafeCtrl active (up1)"), ("saferedir_per_step", "SafeRedir")]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = [n for n, r in res["archs"].items() if "ratios" in r]
    if not names:
        return
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        q = res["archs"][name]["ratios"]
        ax.bar([j + i * width for j in range(len(keys))], [q[k] for k, _ in keys], width,
               label=f"{name} {res['archs'][name]['image']} px")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0.9, None)  # the differences are a few percent
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], [label for _, label in keys],
                  fontsize=8)
    ax.set_ylabel("step time / plain UNet step")
    ax.set_title(f"Guard cost per step, {res['machine']['gpu']}, {res['mode']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> dict:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU: run on a GPU machine or pass --device cpu")
    archs = architectures()
    machine = {"gpu": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
               "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    command = f"python -m bench gpu-overhead --arch {' '.join(args.arch)} --iters {args.iters}" + \
        (" --no-flops" if args.no_flops else "") + (f" --out {args.out}" if args.out else "")
    res = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine,
           "mode": "torch fp16, CUDA graphs" if cuda else "torch fp32, eager", "iters": args.iters, "steps": STEPS,
           "archs": {}}
    for name in args.arch:
        print(f"{name}: building at {archs[name]['image']} px on {device}", flush=True)
        if cuda and len(args.arch) > 1:
            r = _in_child(name, device, args)   # a fresh process and GPU per architecture
        else:
            r = measure(name, archs[name], device, args.iters)
            r["ratios"] = ratios(r)
            if not args.no_flops:
                r["flops"] = count_flops(archs[name])
        res["archs"][name] = r
        if args.out:  # each architecture's rows kept as soon as they exist
            _write(res, args.out)
    return res


def _in_child(name: str, device: str, args) -> dict:
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", "bench", "gpu-overhead", "--arch", name, "--device", device, "--iters",
               str(args.iters), "--out", str(out), *(["--no-flops"] if args.no_flops else [])]
        proc = subprocess.run(cmd, text=True)
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exit code {proc.returncode}", "image": architectures()[name]["image"]}
        return json.loads(out.read_text())["archs"][name]


def _write(res: dict, out: Path) -> None:
    from runtime.bundle import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:
        f.write(json.dumps(res, indent=1).encode())
    with atomic_write(out.with_suffix(".md")) as f:
        f.write(markdown(res).encode())


def add_parser(sub) -> None:
    p = sub.add_parser("gpu-overhead", help="each guard against the plain UNet, torch fp16 + CUDA graphs")
    p.add_argument("--arch", nargs="+", choices=("sd15", "sdxl", "tiny"), default=["sd15", "sdxl"])
    p.add_argument("--device", default=None, help="cuda (default when a GPU is visible) or cpu")
    p.add_argument("--iters", type=int, default=20, help="timed replays per row (median reported)")
    p.add_argument("--no-flops", action="store_true", help="skip the meta-device FLOP count")
    p.add_argument("--out", type=Path, default=None, help="JSON (a .md table and a .png chart beside it)")
    p.set_defaults(func=main)


def main(args) -> int:
    res = run(args)
    if args.out:
        _write(res, args.out)
        try:
            plot(res, args.out.with_suffix(".png"))
        except ImportError:
            print("matplotlib missing: no chart")
        print(f"wrote {args.out} (+ .md, .png)")
    print(markdown(res))
    return 0
