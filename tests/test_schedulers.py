"""Parity of runtime/schedulers.py (numpy) against diffusers' scheduler classes on full trajectories."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from runtime import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20
SHAPE = (2, 4, 8, 8)
TOL = 1e-5

BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
CONFIGS = {
    # SD1 / tinyworld style: DDIM-like, leading spacing, steps_offset 1
    "sd_leading": {"_class_name": "DDIMScheduler", **BETAS, "clip_sample": False, "prediction_type": "epsilon",
                   "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading",
                   "trained_betas": None},
    # SDXL-style Euler config with trailing spacing
    "euler_trailing": {"_class_name": "EulerDiscreteScheduler", **BETAS, "clip_sample": False,
                       "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
                       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                       "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False},
    # plain linear betas, linspace spacing
    "linear_linspace": {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                        "num_train_timesteps": 1000, "timestep_spacing": "linspace", "steps_offset": 0,
                        "clip_sample": False},
}

CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


# A fixed smooth nonlinear "denoiser" of (x, t), identical in numpy and torch. It is close to the optimal epsilon
# predictor for data near 0 (eps ~ x), so latents stay O(1) like in a real run; a model far from any denoiser
# (e.g. 0.3*tanh(x)) blows the DDIM latent up to |x| ~ 30 where 1e-5 is only ~5 float32 ulps.
def model_np(x: np.ndarray, t) -> np.ndarray:
    t = np.float32(t)
    f = np.float32
    return (f(0.9) * x + f(0.1) * np.tanh(f(2) * x) + f(0.01) * (t / f(1000)) * np.cos(x)).astype(np.float32)


def model_torch(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)
    return 0.9 * x + 0.1 * torch.tanh(2 * x) + 0.01 * (t / 1000) * torch.cos(x)


def _diffusers_sched(name: str, config: dict, karras: bool, steps: int):
    cls_name, extra = CLASSES[name]
    cls = getattr(diffusers, cls_name)
    kw = dict(extra)
    if karras and name != "euler_a":
        kw["use_karras_sigmas"] = True
    sched = cls.from_config(config, **kw)
    sched.set_timesteps(steps)
    if karras and name == "euler_a":
        # diffusers' EulerAncestral has no karras option: give it EulerDiscrete's karras schedule
        ref = diffusers.EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)
        ref.set_timesteps(steps)
        sched.sigmas, sched.timesteps = ref.sigmas.clone(), ref.timesteps.clone()
    return sched


def _run_pair(name: str, cfg_name: str, pred: str, karras: bool, monkeypatch=None, config_extra=None,
              steps: int = STEPS):
    config = {**CONFIGS[cfg_name], "prediction_type": pred, **(config_extra or {})}
    rng = np.random.default_rng(1234)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    anc = rng.standard_normal((steps, *SHAPE)).astype(np.float32)

    sched = _diffusers_sched(name, config, karras, steps)
    calls = iter(range(steps))

    def fake_randn(shape, **kw):
        return torch.from_numpy(anc[next(calls)]).to(kw.get("dtype") or torch.float32)

    mod = "diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor"
    if monkeypatch is not None:
        monkeypatch.setattr(mod, fake_randn)
    else:
        import diffusers.schedulers.scheduling_euler_ancestral_discrete as m
        m.randn_tensor = fake_randn
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model_torch(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
    ref = x.numpy()
    ref_ts = sched.timesteps.numpy().astype(np.float32)

    p = S.plan(name, config, steps, karras=karras)
    seen = []
    ours = S.sample(p, model_np, noise, noise_fn=lambda i, shape: anc[i],
                    callback=lambda i, t, xi: seen.append((i, t, xi.shape)))
    assert [s[0] for s in seen] == list(range(steps))
    assert np.array_equal(np.array([s[1] for s in seen], dtype=np.float32), p.timesteps)
    if karras and name in ("euler", "euler_a"):
        # fractional Karras timesteps go through log(train sigmas); torch's CPU float32 sqrt (this AVX512 build;
        # not correctly rounded) differs from numpy's IEEE sqrt in ~20% of the train sigmas, so a few
        # timesteps may differ by an ulp. Integer-valued schedules (everything else) must match exactly.
        np.testing.assert_array_max_ulp(p.timesteps, ref_ts, maxulp=2)
    else:
        assert np.array_equal(p.timesteps, ref_ts), (p.timesteps, ref_ts)
    assert abs(p.init_noise_sigma - float(sched.init_noise_sigma)) <= 1e-6 * max(1.0, p.init_noise_sigma)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    _run_pair.last_mag = float(np.abs(ref).max())
    return float(np.abs(ours - ref).max())


CASES = [(n, c, p, k) for n in S.SCHEDULERS for c in CONFIGS for p in S.PREDICTION_TYPES
         for k in ((False, True) if n in S.KARRAS_SCHEDULERS else (False,))]


@pytest.mark.parametrize("name,cfg,pred,karras", CASES,
                         ids=[f"{n}-{c}-{p}-{'karras' if k else 'plain'}" for n, c, p, k in CASES])
def test_parity(name, cfg, pred, karras, monkeypatch):
    diff = _run_pair(name, cfg, pred, karras, monkeypatch)
    assert diff <= TOL, f"{name}/{cfg}/{pred}/karras={karras}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("name,extra,steps", [
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 20),
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}, 10),   # lower_order_final with < 15 steps
    ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
    ("dpmpp_2m", {"solver_type": "heun"}, 20),
    ("dpmpp_2m", {}, 7),
    ("euler", {"final_sigmas_type": "sigma_min"}, 20),
    ("ddim", {"clip_sample": True, "set_alpha_to_one": True}, 20),
])
def test_parity_options(name, extra, steps, monkeypatch):
    for cfg in ("sd_leading", "euler_trailing"):
        diff = _run_pair(name, cfg, "epsilon", False, monkeypatch, config_extra=extra, steps=steps)
        assert diff <= TOL, f"{name}/{cfg}/{extra}/{steps}: max abs diff {diff:.3g}"


def test_alphas_cumprod_bit_exact():
    for cfg in CONFIGS.values():
        ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
        assert np.array_equal(S.alphas_cumprod(cfg), ref)


def test_errors():
    cfg = CONFIGS["sd_leading"]
    with pytest.raises(ValueError, match="ddim, euler, euler_a, dpmpp_2m"):
        S.plan("heun", cfg, 20)
    for bad in (0, -3, 2.5, True, "20", 1001):
        with pytest.raises(ValueError, match="steps"):
            S.plan("euler", cfg, bad)
    with pytest.raises(ValueError, match="karras"):
        S.plan("ddim", cfg, 20, karras=True)
    with pytest.raises(ValueError, match="prediction_type"):
        S.plan("euler", {**cfg, "prediction_type": "sample"}, 20)
    with pytest.raises(ValueError, match="timestep_spacing"):
        S.plan("euler", {**cfg, "timestep_spacing": "weird"}, 20)
    with pytest.raises(ValueError, match="noise_fn"):
        S.sample(S.plan("euler_a", cfg, 4), model_np, np.zeros(SHAPE, np.float32))


def test_karras_from_config():
    cfg = {**CONFIGS["euler_trailing"], "use_karras_sigmas": True}
    assert np.array_equal(S.plan("euler", cfg, 20).sigmas, S.plan("euler", cfg, 20, karras=True).sigmas)
    assert not np.array_equal(S.plan("euler", cfg, 20).sigmas, S.plan("euler", cfg, 20, karras=False).sigmas)


def test_imports_only_numpy_and_stdlib():
    import sys

    tree = ast.parse((ROOT / "runtime" / "schedulers.py").read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mods.add((node.module or "").split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__"}
    assert mods <= allowed, f"non-stdlib imports: {sorted(mods - allowed)}"


if __name__ == "__main__":  # parity table
    print(f"{'scheduler':10s} {'config':16s} {'prediction':13s} {'karras':6s} max_abs_diff  max|x0|")
    for n, c, p, k in CASES:
        d = _run_pair(n, c, p, k)
        print(f"{n:10s} {c:16s} {p:13s} {str(k):6s} {d:.3g}  {_run_pair.last_mag:.3g}")
