"""Numpy samplers for the lean sampling loop (no torch / diffusers / transformers).

Timestep schedules follow diffusers 0.42 exactly, given the scheduler config dict as diffusers stores it in
``scheduler_config.json``; each sampler is a short pure function in the style of k-diffusion's ``sampling.py``.

    p = plan("euler", config, 20, karras=True)
    x0 = sample(p, model_fn, noise, noise_fn=noise_fn, callback=cb)

``model_fn(x_scaled, timestep) -> model_output`` is the (already guided) model prediction, epsilon or v according to
``plan.prediction_type``; ``noise_fn(i, shape) -> ndarray`` supplies the ancestral noise of step ``i`` (euler_a only);
``callback(i, t, x)`` runs after every step with the new latent.

Supported: ``ddim`` (eta=0), ``euler``, ``euler_a`` and ``dpmpp_2m`` (DPM-Solver++ 2M, midpoint or heun), with
Karras sigmas for the last three, prediction types ``epsilon`` / ``v_prediction``, beta schedules ``linear`` /
``scaled_linear`` / ``trained_betas`` and timestep spacings ``leading`` / ``trailing`` / ``linspace``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp_2m")
KARRAS_SCHEDULERS = ("euler", "euler_a", "dpmpp_2m")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")

ModelFn = Callable[[np.ndarray, np.float32], np.ndarray]
NoiseFn = Callable[[int, tuple], np.ndarray]
Callback = Callable[[int, float, np.ndarray], None]

F32 = np.float32


@dataclass(frozen=True)
class Plan:
    """Everything a sampler needs, precomputed from the config (all arrays float32)."""

    name: str
    timesteps: np.ndarray  # (n,) model timesteps fed to the UNet
    init_noise_sigma: float  # multiply unit noise by this to get x_T
    prediction_type: str
    sigmas: np.ndarray | None = None  # (n+1,) euler/euler_a/dpmpp_2m, last is the final sigma
    alphas: np.ndarray | None = None  # (n,) ddim: alphas_cumprod at t_i
    alphas_prev: np.ndarray | None = None  # (n,) ddim: alphas_cumprod at t_i - N//n (or the final alpha)
    clip_sample: float | None = None  # ddim: clamp x0 to +-clip_sample
    euler_last: bool = True  # dpmpp_2m: take a first-order step at the last step
    solver_type: str = "midpoint"  # dpmpp_2m: midpoint or heun

    @property
    def steps(self) -> int:
        return len(self.timesteps)


# --------------------------------------------------------------------------------------------- schedule (diffusers)

_DEFAULT_SPACING = {"ddim": "leading", "euler": "linspace", "euler_a": "linspace", "dpmpp_2m": "linspace"}


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """Bit-exact float32 ``torch.linspace`` on CPU (fma of a float32 step, symmetric from both ends)."""
    a, b = F32(start), F32(end)
    if n == 1:
        return np.array([a], dtype=F32)
    step = np.float64(F32((b - a) / F32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    out = np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i))
    return out.astype(F32)


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """Training alphas_cumprod as diffusers computes them (float32, torch CPU cumprod accumulates in double)."""
    n = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], dtype=F32)
    elif schedule == "linear":
        betas = _torch_linspace_f32(b0, b1, n)
    elif schedule == "scaled_linear":
        betas = _torch_linspace_f32(b0 ** 0.5, b1 ** 0.5, n) ** 2
    else:
        raise ValueError(f"beta_schedule {schedule!r} is not supported; use 'linear' or 'scaled_linear'")
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True is not supported")
    return np.cumprod((F32(1) - betas).astype(np.float64)).astype(F32)


def _spaced_timesteps(config: Mapping[str, Any], steps: int, spacing: str, *, dpm: bool = False) -> np.ndarray:
    """Integer-valued timesteps (float64) per diffusers' spacing rules; DPM-Solver uses steps+1 points for
    leading/linspace and drops the last one."""
    n_train = int(config.get("num_train_timesteps", 1000))
    offset = int(config.get("steps_offset", 0))
    if spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; valid: {', '.join(SPACINGS)}")
    if dpm:
        last = n_train  # lambda_min_clipped handled by the caller
        if spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy()
        if spacing == "leading":
            return (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + offset
        return np.arange(last, 0, -(n_train / steps)).round() - 1
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, steps) * (n_train // steps)).round()[::-1] + offset
    return np.round(np.arange(n_train, 0, -(n_train / steps))) - 1


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """diffusers' log-sigma interpolation back to (fractional) training timesteps (same dtypes, same rounding)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def _karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def _final_sigma(config: Mapping[str, Any], ac: np.ndarray) -> float:
    kind = config.get("final_sigmas_type", "zero")
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(((F32(1) - ac[0]) / ac[0]) ** F32(0.5))
    raise ValueError(f"final_sigmas_type {kind!r} is not supported; use 'zero' or 'sigma_min'")


def _check_unsupported(config: Mapping[str, Any]) -> None:
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "thresholding"):
        if config.get(key):
            raise ValueError(f"scheduler config {key}=True is not supported")
    if config.get("interpolation_type", "linear") != "linear":
        raise ValueError("only interpolation_type='linear' is supported")
    if config.get("timestep_type", "discrete") != "discrete":
        raise ValueError("only timestep_type='discrete' is supported")


def plan(name: str, config: Mapping[str, Any], steps: int, *, karras: bool | None = None) -> Plan:
    """Precompute the schedule of scheduler ``name`` for ``steps`` steps from a diffusers scheduler config dict.

    ``karras=None`` takes ``use_karras_sigmas`` from the config; True/False overrides it."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = int(steps)
    n_train = int(config.get("num_train_timesteps", 1000))
    if steps > n_train:
        raise ValueError(f"steps={steps} exceeds num_train_timesteps={n_train}")
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {pred!r} is not supported; valid: {', '.join(PREDICTION_TYPES)}")
    if karras is None:
        karras = bool(config.get("use_karras_sigmas", False))
    if karras and name not in KARRAS_SCHEDULERS:
        raise ValueError(f"karras sigmas are not available for {name!r}; valid: {', '.join(KARRAS_SCHEDULERS)}")
    _check_unsupported(config)
    spacing = config.get("timestep_spacing", _DEFAULT_SPACING[name])
    ac = alphas_cumprod(config)
    train_sigmas = ((F32(1) - ac) / ac) ** F32(0.5)  # float32, ascending in t
    log_sigmas = np.log(train_sigmas)

    if name == "ddim":
        if spacing == "linspace":  # DDIM rounds linspace to integers
            ts = np.linspace(0, n_train - 1, steps).round()[::-1].astype(np.int64)
        else:
            ts = _spaced_timesteps(config, steps, spacing).astype(np.int64)
        final = F32(1.0) if config.get("set_alpha_to_one", True) else ac[0]
        prev = ts - n_train // steps
        alphas_prev = np.array([ac[p] if p >= 0 else final for p in prev], dtype=F32)
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        return Plan(name, ts.astype(F32), 1.0, pred, alphas=ac[ts], alphas_prev=alphas_prev, clip_sample=clip)

    if name == "dpmpp_2m":
        lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(F32(1) - ac))
        clipped = int(np.searchsorted(lam[::-1], config.get("lambda_min_clipped", -math.inf), side="left"))
        if clipped:
            raise ValueError("lambda_min_clipped that clips the schedule is not supported")
        ts = _spaced_timesteps(config, steps, spacing, dpm=True)
        if karras:
            sig = _karras(float(train_sigmas[0]), float(train_sigmas[-1]), steps)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig]).round()
        else:
            sig = np.interp(ts.astype(np.int64), np.arange(len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sig, [_final_sigma(config, ac)]]).astype(F32)
        ts = ts.astype(np.int64)
        n = len(ts)
        euler_last = (bool(config.get("euler_at_final", False))
                      or (bool(config.get("lower_order_final", True)) and n < 15)
                      or config.get("final_sigmas_type", "zero") == "zero")
        solver_type = config.get("solver_type", "midpoint")
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type {solver_type!r} is not supported; use 'midpoint' or 'heun'")
        return Plan(name, ts.astype(F32), 1.0, pred, sigmas=sigmas, euler_last=euler_last, solver_type=solver_type)

    # euler / euler_a (EulerDiscreteScheduler rules; diffusers' EulerAncestral has no karras, same sigmas otherwise)
    ts = _spaced_timesteps(config, steps, spacing).astype(F32)
    sig = np.interp(ts, np.arange(len(train_sigmas)), train_sigmas)
    if karras:
        smin = config.get("sigma_min")
        smax = config.get("sigma_max")
        sig = _karras(float(sig[-1]) if smin is None else smin, float(sig[0]) if smax is None else smax, steps)
        ts = np.array([_sigma_to_t(s, log_sigmas) for s in sig])
    final = _final_sigma(config, ac) if name == "euler" else 0.0
    sigmas = np.concatenate([sig, [final]]).astype(F32)
    smax = sigmas.max()
    init = smax if spacing in ("linspace", "trailing") else (smax ** F32(2) + F32(1)) ** F32(0.5)
    return Plan(name, ts.astype(F32), float(init), pred, sigmas=sigmas)


# --------------------------------------------------------------------------------------------- samplers


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=F32)


def sample_ddim(model_fn: ModelFn, x: np.ndarray, timesteps: np.ndarray, alphas: np.ndarray,
                alphas_prev: np.ndarray, *, prediction_type: str = "epsilon", clip_sample: float | None = None,
                callback: Callback | None = None) -> np.ndarray:
    """Deterministic DDIM (eta=0). ``x`` is x_T (init_noise_sigma is 1)."""
    x = _f32(x)
    for i, t in enumerate(timesteps):
        a, a_prev = F32(alphas[i]), F32(alphas_prev[i])
        b = F32(1) - a
        out = _f32(model_fn(x, F32(t)))
        if prediction_type == "epsilon":
            x0, eps = (x - b ** F32(0.5) * out) / a ** F32(0.5), out
        else:
            x0 = a ** F32(0.5) * x - b ** F32(0.5) * out
            eps = a ** F32(0.5) * out + b ** F32(0.5) * x
        if clip_sample is not None:
            x0 = np.clip(x0, -clip_sample, clip_sample)
            # diffusers (use_clipped_model_output=False) keeps eps from the unclipped prediction
        x = _f32(a_prev ** F32(0.5) * x0 + (F32(1) - a_prev) ** F32(0.5) * eps)
        if callback is not None:
            callback(i, float(t), x)
    return x


def _denoised(out: np.ndarray, x: np.ndarray, sigma: np.float32, prediction_type: str) -> np.ndarray:
    """x0 prediction for k-diffusion-style (variance exploding) x at ``sigma``."""
    if prediction_type == "epsilon":
        return x - sigma * out
    return out * (-sigma / (sigma ** F32(2) + F32(1)) ** F32(0.5)) + x / (sigma ** F32(2) + F32(1))


def _scaled(x: np.ndarray, sigma: np.float32) -> np.ndarray:
    return x / (sigma ** F32(2) + F32(1)) ** F32(0.5)


def sample_euler(model_fn: ModelFn, x: np.ndarray, sigmas: np.ndarray, timesteps: np.ndarray, *,
                 prediction_type: str = "epsilon", callback: Callback | None = None) -> np.ndarray:
    """Euler (k-diffusion ``sample_euler`` with s_churn=0). ``x`` is x_T = noise * init_noise_sigma."""
    x = _f32(x)
    for i, t in enumerate(timesteps):
        s, s_next = F32(sigmas[i]), F32(sigmas[i + 1])
        x0 = _denoised(_f32(model_fn(_scaled(x, s), F32(t))), x, s, prediction_type)
        x = _f32(x + (x - x0) / s * (s_next - s))
        if callback is not None:
            callback(i, float(t), x)
    return x


def sample_euler_ancestral(model_fn: ModelFn, x: np.ndarray, sigmas: np.ndarray, timesteps: np.ndarray,
                           noise_fn: NoiseFn, *, prediction_type: str = "epsilon",
                           callback: Callback | None = None) -> np.ndarray:
    """Euler ancestral (eta=1). ``noise_fn(i, shape)`` gives the unit noise added after step ``i``."""
    x = _f32(x)
    for i, t in enumerate(timesteps):
        s, s_next = F32(sigmas[i]), F32(sigmas[i + 1])
        x0 = _denoised(_f32(model_fn(_scaled(x, s), F32(t))), x, s, prediction_type)
        s_up = (s_next ** F32(2) * (s ** F32(2) - s_next ** F32(2)) / s ** F32(2)) ** F32(0.5)
        s_down = (s_next ** F32(2) - s_up ** F32(2)) ** F32(0.5)
        x = x + (x - x0) / s * (s_down - s)
        x = _f32(x + _f32(noise_fn(i, x.shape)) * s_up)
        if callback is not None:
            callback(i, float(t), x)
    return x


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    alpha = F32(1) / (sigma ** F32(2) + F32(1)) ** F32(0.5)
    return alpha, sigma * alpha


def sample_dpmpp_2m(model_fn: ModelFn, x: np.ndarray, sigmas: np.ndarray, timesteps: np.ndarray, *,
                    prediction_type: str = "epsilon", euler_last: bool = True, solver_type: str = "midpoint",
                    callback: Callback | None = None) -> np.ndarray:
    """DPM-Solver++(2M) on the variance-preserving x (init_noise_sigma is 1, the model sees x unscaled).
    First step and (if ``euler_last``) last step are first order, as in diffusers."""
    x = _f32(x)
    n, old_x0, lam_prev = len(timesteps), None, None
    for i, t in enumerate(timesteps):
        s, s_next = F32(sigmas[i]), F32(sigmas[i + 1])
        a_s, sg_s = _alpha_sigma(s)
        out = _f32(model_fn(x, F32(t)))
        x0 = (x - sg_s * out) / a_s if prediction_type == "epsilon" else a_s * x - sg_s * out
        x0 = _f32(x0)
        lam_s = np.log(a_s) - np.log(sg_s)
        if s_next == 0:  # h = inf: the first-order update is exactly x0
            x = x0
        else:
            a_t, sg_t = _alpha_sigma(s_next)
            h = (np.log(a_t) - np.log(sg_t)) - lam_s
            em1 = np.exp(-h) - F32(1)
            if old_x0 is None or (euler_last and i == n - 1):
                x = (sg_t / sg_s) * x - (a_t * em1) * x0
            else:
                r = (lam_s - lam_prev) / h
                d1 = (F32(1) / r) * (x0 - old_x0)
                if solver_type == "midpoint":
                    x = (sg_t / sg_s) * x - (a_t * em1) * x0 - F32(0.5) * (a_t * em1) * d1
                else:
                    x = (sg_t / sg_s) * x - (a_t * em1) * x0 + (a_t * (em1 / h + F32(1))) * d1
            x = _f32(x)
        old_x0, lam_prev = x0, lam_s
        if callback is not None:
            callback(i, float(t), x)
    return x


def sample(plan: Plan, model_fn: ModelFn, noise: np.ndarray, *, noise_fn: NoiseFn | None = None,
           callback: Callback | None = None) -> np.ndarray:
    """Run ``plan`` from unit Gaussian ``noise`` (scaled here by ``plan.init_noise_sigma``) to x_0."""
    x = _f32(noise) * F32(plan.init_noise_sigma)
    kw = dict(prediction_type=plan.prediction_type, callback=callback)
    if plan.name == "ddim":
        return sample_ddim(model_fn, x, plan.timesteps, plan.alphas, plan.alphas_prev,
                           clip_sample=plan.clip_sample, **kw)
    if plan.name == "euler":
        return sample_euler(model_fn, x, plan.sigmas, plan.timesteps, **kw)
    if plan.name == "euler_a":
        if noise_fn is None:
            raise ValueError("euler_a needs noise_fn(i, shape) for its ancestral noise")
        return sample_euler_ancestral(model_fn, x, plan.sigmas, plan.timesteps, noise_fn, **kw)
    if plan.name == "dpmpp_2m":
        return sample_dpmpp_2m(model_fn, x, plan.sigmas, plan.timesteps, euler_last=plan.euler_last,
                               solver_type=plan.solver_type, **kw)
    raise ValueError(f"unknown scheduler {plan.name!r}; valid schedulers: {', '.join(SCHEDULERS)}")
