"""Log-likelihoods of noise-prediction models: probability-flow ODE, bits/dim, and ELBOs.

Notation (sde/sdes.py): x_t = alpha(t) x_0 + sigma(t) z, the log-SNR
lambda(t) = log(alpha(t) / sigma(t)) (decreasing in t), the network eps_theta(x, t) and
the score -eps_theta / sigma(t).

**Probability-flow ODE** (Song et al. 2021, eq. 13). With f = d log alpha/dt and
g^2 = -2 sigma^2 d lambda/dt (sde/sdes.py eq. 2),

    dx/dt = f(t) x - 1/2 g(t)^2 score = f(t) x + 1/2 g(t)^2 / sigma(t) * eps_theta(x, t).   (t)

The instantaneous change of variables (Chen et al. 2018, Thm 1; Song et al. eq. 39-40)
gives, along a solution from x_eps = x to x_T,

    log p_eps(x) = log p_T(x_T) + int_eps^T div_x (dx/dt) dt,

with p_T replaced by the prior N(0, prior_std^2 I). A monotone change of the integration
variable leaves the integral unchanged but not the stiffness the adaptive solver sees.
Besides t (as score_sde) the log-SNR lambda serves: dividing (t) by
d lambda/dt = -g^2 / (2 sigma^2),

    dx/dlambda = -2 sigma^2 f / g^2 * x - sigma(t) eps_theta(x, t(lambda)),
    div_x      = -2 sigma^2 f / g^2 * D - sigma(t) div_x eps_theta,                  (lambda)

(for VP -2 sigma^2 f / g^2 = sigma^2). Near t = eps, where lambda ~ -log(t)/2 changes
fastest, the noise level a trained network reacts to is spaced evenly in lambda. The state
stays x: in the DPM-Solver variable x / alpha (Lu et al. 2022, eq. 3.4) the state grows
like 1/alpha at low SNR and costs twice the evaluations (measured on Gaussian data).
``bench/likelihood_speed.py`` measures error against cost for both variables; the
defaults below are the best point of its table (numbers in the README).

The divergence of eps_theta is either exact (one vector-Jacobian product per dimension,
for low dimensions) or the Hutchinson-Skilling estimate v^T (d eps / dx) v with one probe
v (Rademacher or Gaussian) drawn once per solve and held fixed along the path, which makes
the integrated estimate unbiased for the integrated trace.

**Bits/dim of 8-bit images** (uniform dequantization, Theis et al. 2016; Ho et al. 2020
sec. 4). For pixel values u in {0..255}^D and v ~ U[0,1)^D, the point w = u + v lies in
[0, 256)^D and any density p_w there defines a pmf P(u) = int_{[0,1)^D} p_w(u + v) dv
with, by Jensen, -log P(u) <= E_v[-log p_w(u + v)]. The model sees the affine image
x = a w + b (``sde.data.uint8_to_float``: a = 2/256, b = -1, x in [-1, 1)); the change of
variables p_w(w) = p_x(x) |dx/dw| = p_x(x) a^D gives

    bits/dim = -log p_w(w) / (D ln 2) = -log p_x(x) / (D ln 2) - log2(a)
             = -log p_x(x) / (D ln 2) + log2(256) - log2(2)        (= ... + 7 for 8 bits),

the value score_sde writes as a magic ``offset = 7 - inverse_scaler(-1)``. In expectation
over v this bounds -log2 P(u) / D >= 0 from above, so it cannot go negative, while a
continuous density evaluated on the raw pixel grid can (and does, for sharp models).

**Truncated-normal dequantization** (Zheng et al. 2023, "Improved Techniques for Maximum
Likelihood Estimation for Diffusion ODEs", training-free truncated-normal dequantization).
Uniform points fill each pixel's bin evenly, but a network trained on the pixel grid only
ever saw grid points plus Gaussian noise. Give pixel u the interval B_u of half-width h
centred on the value c_u the network was trained on (plain map: c_u = 2u/255 - 1,
h = 1/255; dequantized training: c_u = 2(u + 1/2)/256 - 1, h = 1/256); the B_u tile the
line. At a time t0 > 0 the ODE density p_t0 of x_t0 defines the pmf
P(u) = int_{alpha_t0 B_u} p_t0(y) dy (the scaled bins are disjoint, so sum_u P(u) <= 1),
and for any density q(y | u) inside alpha_t0 B_u, by Jensen,

    -log P(u) <= E_q[log q(y | u) - log p_t0(y)].

Take q = the training noise at t0 truncated to the bin: y = alpha_t0 c_u + sigma_t0 z with
z ~ N(0, I) truncated to [-tau, tau]^D, tau = alpha_t0 h / sigma_t0, so that

    log q(y | u) = sum_d [-log(sigma_t0 sqrt(2 pi)) - log Z - z_d^2 / 2],  Z = erf(tau / sqrt 2).

``truncation`` is tau; t0 solves lambda(t0) = log(alpha_t0 / sigma_t0) = log(tau / h).
Large tau puts t0 where the network was trained least well and q nearly untruncated;
tau -> 0 makes q uniform on the bin at a noisy t0 where p_t0 spreads over neighbouring
bins. No Jacobian enters: y and p_t0 live in the same space.

**Continuous-time ELBO** (Kingma et al. 2021, "Variational Diffusion Models": the
continuous-time loss L_inf = 1/2 E[gamma'(t) ||z - eps_theta||^2], gamma = -log SNR; Song
et al. 2021b, "Maximum Likelihood Training of Score-Based Diffusion Models", Thm 1 and 3;
Huang et al. 2021). With latents z_t ~ q(z_t | x) = N(alpha_t x,
sigma_t^2 I) on [eps, T] and SNR(t) = alpha_t^2 / sigma_t^2 = exp(2 lambda(t)),

    -log p(x) <= KL(q(z_T | x) || N(0, prior_std^2 I))                             (prior)
               + E_q[-log N(x; z_eps / alpha_eps, sigma_eps^2 / alpha_eps^2 I)]      (reconstruction)
               + 1/2 int_eps^T (-dSNR/dt) E_z ||x - x0_theta(z_t, t)||^2 dt.          (diffusion)

The reconstruction term is exactly D (log(2 pi)/2 + 1/2 - lambda(eps)), since
x - z_eps/alpha_eps = -exp(-lambda(eps)) z. With x0_theta = (z_t - sigma eps_theta)/alpha,
x - x0_theta = exp(-lambda) (eps_theta - z) and dSNR/dt = 2 lambda' exp(2 lambda), so

    diffusion = int_eps^T (-dlambda/dt) E ||z - eps_theta(z_t, t)||^2 dt
              = int_{lambda(T)}^{lambda(eps)} E ||z - eps_theta(z_{t(lambda)}, t(lambda))||^2 dlambda.

In score form (-dlambda/dt) ||z - eps_theta||^2 = g^2/2 ||grad log q_0t(z_t|x) - s_theta||^2:
Song et al.'s likelihood-weighted denoising score matching bound. The last integral is
estimated by Monte Carlo over lambda, stratified over ``num_times`` points per image and
importance-sampled by a ``LogSnrProposal`` fitted by a short pilot: the integrand of a
trained image model grows by two orders of magnitude from low to high SNR, so uniform
lambda (which cancels the weight -dlambda/dt) has a per-image standard deviation of
several bits/dim, the fitted proposal about five times less.

**Discrete DDPM ELBO** (Ho et al. 2020, eq. 5) over the DDPM tables of N steps:
L = L_N + sum_{i=2}^N L_{i-1} + L_0 with L_N = KL(q(x_N | x_0) || N(0, I)),
L_{i-1} = KL(q(x_{i-1} | x_i, x_0) || p_theta(x_{i-1} | x_i)) where p_theta has the
posterior mean at x0_theta and the posterior variance beta_tilde_i, so that

    L_{i-1} = w_i E ||z - eps_theta(x_i, t_i)||^2,
    w_i = beta_i^2 / (2 beta_tilde_i (1 - beta_i)(1 - alpha_bar_i))
        = beta_i / (2 (1 - beta_i)(1 - alpha_bar_{i-1}))  = (SNR_{i-1} / SNR_i - 1) / 2,

and L_0 = -log p_theta(x_0 | x_1), the discretized Gaussian decoder (Ho et al. eq. 13)
with mean x0_theta(x_1) and variance beta_tilde_2 (beta_tilde_1 = 0, so step 1 takes
step 2's value, as in Ho et al.'s released code). The sum is estimated like the integral,
with the steps as the base measure (probability w_i / sum w unfitted, the discrete
counterpart of uniform lambda). This bounds the pmf of the pixels directly: no
dequantization and no Jacobian.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torchdiffeq
from torch import nn

from sde.data import MAX_PIXEL_VALUE, NUM_PIXEL_LEVELS, uint8_to_float
from sde.sdes import SDE, broadcast_to

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], Tensor]

DIVERGENCES = ("rademacher", "gaussian", "exact")
VARIABLES = ("t", "log_snr")
#: torchdiffeq's solvers with error control (the likelihood needs a controlled error).
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: The best point of bench/likelihood_speed.py's error-versus-cost table (2026-11-22, 8
#: train5k images, a 3000-step nf=16 mnist_vp model, reference dopri5 at 1e-8): log-SNR at
#: rtol = atol = 1e-4 took 152 NFE / 9.1 s with |bpd - ref| = 0.0028 mean, 0.0071 worst
#: image; score_sde's RK45 at 1e-5 in t took 590 NFE / 43.4 s (0.0002). 1e-5 in log-SNR
#: cost 650 NFE for no useful gain; t at 1e-4 needed 200 NFE / 22.1 s.
DEFAULT_VARIABLE = "log_snr"
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4
DEFAULT_EPS = 1e-5
DEQUANTIZATIONS = ("uniform", "truncated_normal")
#: tau of truncated-normal dequantization, in standard deviations of the noise at t0 (module
#: docstring); chosen on training images of the released model (``bench/dequantization.py
#: --split test``, BENCHMARKS.md).
DEFAULT_TRUNCATION = 2.0


# ---- data scaling (sde.data.uint8_to_float is the one place that defines it) ---------------
#: dx/dw of the dequantized map x = (u + v) * 2 / NUM_PIXEL_LEVELS - 1, w = u + v.
DEQUANTIZED_SLOPE = 2.0 / NUM_PIXEL_LEVELS
#: Spacing of the plain map x = u * 2 / MAX_PIXEL_VALUE - 1 (the DDPM decoder's pixel grid).
PLAIN_SLOPE = 2.0 / MAX_PIXEL_VALUE


def dequantized_bits_per_dim(log_px: Tensor, num_dims: int) -> Tensor:
    """Bits/dim of the pixels from log p_x(x) of their dequantized, scaled image x.

    bits/dim = -log p_x(x) / (D ln 2) - log2(a) with a = dx/dw = DEQUANTIZED_SLOPE
    (module docstring).
    """
    return -log_px / (num_dims * math.log(2.0)) - math.log2(DEQUANTIZED_SLOPE)


# ---- helpers ---------------------------------------------------------------------------
def _generator_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def _model_dtype_device(model: Model, x: Tensor) -> tuple[torch.dtype, torch.device]:
    """The dtype and device the network computes in (its first parameter's, else x's)."""
    if isinstance(model, nn.Module):
        if model.training:
            raise ValueError("the model is in training mode (dropout active); call model.eval() "
                             "before computing likelihoods")
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.dtype, parameter.device
    return x.dtype if x.is_floating_point() else torch.float32, x.device


class _CountedModel:
    """Calls the network in its own dtype with t of shape [B]; counts the evaluations."""

    def __init__(self, model: Model, dtype: torch.dtype):
        self.model, self.dtype, self.calls = model, dtype, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.model(x.to(self.dtype), t.to(device=x.device, dtype=self.dtype))


def _check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted: {', '.join(map(repr, accepted))}")


def _check_eps(sde: SDE, eps: float) -> None:
    if not 0.0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T) = (0, {sde.T:g}), got {eps}")


def _draw_probe(divergence: str, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """One Hutchinson probe per sample, E[v v^T] = I: Rademacher signs or N(0, I) (float64)."""
    device = _generator_device(generator, like.device)
    if divergence == "rademacher":
        signs = torch.randint(0, 2, like.shape, generator=generator, device=device)
        probe = 2.0 * signs.double() - 1.0
    else:
        probe = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float64)
    return probe.to(like.device)


def mean_and_standard_error(values: Tensor) -> tuple[float, float, float]:
    """values [images, repeats] -> (mean, standard error, estimator standard error).

    Images are the independent unit: the standard error is the spread of the per-image
    means over sqrt(images) (with one image, the spread over repeats). The estimator
    standard error keeps only the Monte Carlo noise of the estimator (dequantization,
    probes, times): the pooled within-image variance over sqrt(images * repeats).
    """
    images, repeats = values.shape
    mean = values.mean().item()
    per_image = values.mean(1)
    if images > 1:
        standard_error = (per_image.std() / math.sqrt(images)).item()
    elif repeats > 1:
        standard_error = (values.std() / math.sqrt(repeats)).item()
    else:
        standard_error = float("nan")
    estimator = ((values.var(1).mean() / (images * repeats)).sqrt().item()
                 if repeats > 1 else float("nan"))
    return mean, standard_error, estimator


# ---- probability-flow ODE ----------------------------------------------------------------
class _AugmentedFlow:
    """Right-hand side of the augmented state (x, delta-logp) in the integration variable s:
    eq. (t) of the module docstring for s = t, eq. (lambda) for s = log-SNR, with
    d delta / ds = div_x (dx/ds).
    """

    def __init__(self, model: _CountedModel, sde: SDE, variable: str, divergence: str,
                 probe: Tensor | None):
        self.model, self.sde, self.variable = model, sde, variable
        self.divergence, self.probe = divergence, probe

    def _eps_and_divergence(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """eps_theta(x, t) and its divergence in x (exact or Hutchinson), both float64."""
        with torch.enable_grad():
            x_in = x.detach().to(self.model.dtype).requires_grad_(True)
            eps = self.model(x_in, t)
            if self.divergence == "exact":
                eps_flat = eps.flatten(1)
                dims = eps_flat.shape[1]
                diagonal = [torch.autograd.grad(eps_flat[:, d].sum(), x_in,
                                                retain_graph=d < dims - 1)[0].flatten(1)[:, d]
                            for d in range(dims)]
                divergence = torch.stack(diagonal, 1).sum(1)
            else:
                (vjp,) = torch.autograd.grad(eps, x_in, self.probe.to(eps.dtype))
                divergence = (vjp.double() * self.probe).flatten(1).sum(1)
        return eps.detach().double(), divergence.double()

    def __call__(self, s: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = state[0]
        t = s if self.variable == "t" else self.sde.t_from_log_snr(s)
        f_t, g2_t, sigma_t = self.sde.drift_coef(t), self.sde.diffusion_sq(t), self.sde.sigma(t)
        eps, div_eps = self._eps_and_divergence(x, t)
        eps_scale = 0.5 * g2_t / sigma_t
        velocity, divergence = f_t * x + eps_scale * eps, x[0].numel() * f_t + eps_scale * div_eps
        if self.variable == "t":
            return velocity, divergence
        dt_dlog_snr = -2.0 * sigma_t ** 2 / g2_t
        return dt_dlog_snr * velocity, dt_dlog_snr * divergence


def ode_log_likelihood(model: Model, sde: SDE, x: Tensor, *, divergence: str = "rademacher",
                       rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                       eps: float = DEFAULT_EPS, method: str = "dopri5",
                       variable: str = DEFAULT_VARIABLE, generator: torch.Generator | None = None,
                       probe: Tensor | None = None, options: dict | None = None
                       ) -> tuple[Tensor, dict]:
    """log p_eps(x) in nats per sample [B] by the probability-flow ODE (Song et al. eq. 39-40).

    One ``torchdiffeq.odeint`` call integrates the augmented state (y, delta-logp) in
    float64 from ``eps`` to ``sde.T`` on the model's device; the network runs in its own
    dtype. ``variable`` is "t" or "log_snr" (module docstring; the result agrees in the
    limit of tight tolerances). ``divergence``: "rademacher" / "gaussian" (Hutchinson-
    Skilling with one fixed ``probe`` per sample, drawn from ``generator`` unless given)
    or "exact" (D vector-Jacobian products per evaluation). ``options`` go to torchdiffeq.

    Returns (logp, info) with info["nfe"] the number of network evaluations (one per
    ODE function evaluation, whatever the divergence), info["prior_logp"] = log pi(x_T),
    info["delta_logp"] = logp - prior_logp, and the latent info["x_T"].
    """
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("variable", variable, VARIABLES)
    _check_choice("method", method, ADAPTIVE_METHODS)
    _check_eps(sde, eps)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    dtype, device = _model_dtype_device(model, x)
    x = x.to(device=device, dtype=torch.float64)
    if divergence != "exact":
        if probe is None:
            probe = _draw_probe(divergence, x, generator)
        elif probe.shape != x.shape:
            raise ValueError(f"probe must have the shape of x {list(x.shape)}, got {list(probe.shape)}")
        probe = probe.to(device=device, dtype=torch.float64)
    counted = _CountedModel(model, dtype)
    flow = _AugmentedFlow(counted, sde, variable, divergence, probe)

    ends = torch.tensor([eps, sde.T], dtype=torch.float64, device=device)
    span = ends if variable == "t" else sde.log_snr(ends)
    delta0 = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
    # step_t: land on the end point instead of stepping past it and interpolating back
    # (beyond T the schedule may not exist, e.g. the cosine VP's beta diverges)
    options = {"step_t": span[1:], **(options or {})}
    with torch.no_grad():
        states, deltas = torchdiffeq.odeint(flow, (x, delta0), span, rtol=rtol, atol=atol,
                                            method=method, options=options)
    x_T, delta_logp = states[-1], deltas[-1]
    prior_logp = sde.prior_logp(x_T)
    info = {"nfe": counted.calls, "prior_logp": prior_logp, "delta_logp": delta_logp,
            "x_T": x_T, "variable": variable, "method": method, "rtol": rtol, "atol": atol}
    return prior_logp + delta_logp, info


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim < 2:
        raise ValueError(f"expected uint8 images of shape [N, ...], got {images.dtype} "
                         f"{list(images.shape)}")


def truncation_time(sde: SDE, truncation: float, dequantized_grid: bool = False) -> float:
    """t0 of truncated-normal dequantization: lambda(t0) = log(tau / h) (module docstring)."""
    if not truncation > 0:
        raise ValueError(f"truncation (tau) must be > 0, got {truncation}")
    half_width = (DEQUANTIZED_SLOPE if dequantized_grid else PLAIN_SLOPE) / 2
    log_snr = torch.tensor(math.log(truncation / half_width), dtype=torch.float64)
    lowest, highest = (sde.log_snr(torch.tensor(t, dtype=torch.float64)).item() for t in (sde.T, 0.0))
    if not lowest < log_snr.item() < highest:
        raise ValueError(f"truncation tau={truncation} puts t0 outside (0, T): its log-SNR "
                         f"{log_snr.item():.3f} is not in ({lowest:.3f}, {highest:.3f}); take "
                         f"tau in ({half_width * math.exp(lowest):.3g}, {half_width * math.exp(highest):.3g})")
    return sde.t_from_log_snr(log_snr).item()


def truncated_normal_dequantization(sde: SDE, images: Tensor, truncation: float, *,
                                    dequantized_grid: bool = False,
                                    generator: torch.Generator | None = None
                                    ) -> tuple[Tensor, float, Tensor]:
    """(y, t0, log q(y | u)) of truncated-normal dequantization (module docstring): y [B, ...]
    float64 on ``images``' device, log q [B] in nats. ``dequantized_grid``: the network was
    trained on dequantized pixels (bins centred on (u + 1/2)), else on the plain grid."""
    t0 = truncation_time(sde, truncation, dequantized_grid)
    t0_tensor = torch.tensor(t0, dtype=torch.float64)
    alpha, sigma = sde.alpha(t0_tensor).item(), sde.sigma(t0_tensor).item()
    if dequantized_grid:
        centers = (images.double() + 0.5) * DEQUANTIZED_SLOPE - 1.0
    else:
        centers = uint8_to_float(images, dequantize=False).double()
    # inverse-CDF draws of N(0, 1) truncated to [-tau, tau]
    low = torch.special.ndtr(torch.tensor(-truncation, dtype=torch.float64)).item()
    uniforms = torch.rand(images.shape, generator=generator, dtype=torch.float64,
                          device=_generator_device(generator, images.device)).to(images.device)
    z = torch.special.ndtri(low + (1.0 - 2.0 * low) * uniforms)
    log_mass = math.log(math.erf(truncation / math.sqrt(2.0)))
    log_q = (-math.log(sigma * math.sqrt(2.0 * math.pi)) - log_mass - 0.5 * z ** 2).flatten(1).sum(1)
    return alpha * centers + sigma * z, t0, log_q


def bits_per_dim(model: Model, sde: SDE, images: Tensor, *, repeats: int = 1,
                 generator: torch.Generator | None = None, batch_size: int = 128,
                 dequantization: str = "uniform", truncation: float = DEFAULT_TRUNCATION,
                 dequantized_grid: bool = False, **ode_options) -> tuple[float, float, dict]:
    """Bits/dim of uint8 images by the probability-flow ODE, an upper bound on -log2 P / D.

    ``dequantization``: "uniform" (Theis et al.; the ODE starts at ``eps`` from the
    dequantized pixels, with the change of variables of ``dequantized_bits_per_dim``) or
    "truncated_normal" (Zheng et al. 2023; the ODE starts at the t0 of ``truncation`` from
    ``truncated_normal_dequantization``, whose bins follow the grid the network was trained
    on, ``dequantized_grid``); module docstring. For each of ``repeats`` passes and each
    batch: fresh dequantization noise and fresh probes from ``generator``, then
    ``ode_log_likelihood(**ode_options)``. Returns (mean, standard error, info):
    info["per_image"] [N, repeats] bits/dim, info["estimator_standard_error"] (the Monte
    Carlo part alone, see ``mean_and_standard_error``), info["nfe"] summed over all solves
    and info["t0"], the time the ODE starts at.
    """
    _check_images(images)
    _check_choice("dequantization", dequantization, DEQUANTIZATIONS)
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")
    truncated = dequantization == "truncated_normal"
    if truncated and "eps" in ode_options:
        raise ValueError("eps is not an option of truncated-normal dequantization: its start "
                         "time t0 follows from truncation (tau)")
    t0 = (truncation_time(sde, truncation, dequantized_grid) if truncated
          else ode_options.get("eps", DEFAULT_EPS))
    dims = images[0].numel()
    per_image = torch.empty(images.shape[0], repeats, dtype=torch.float64)
    nfe = 0
    for repeat in range(repeats):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]
            if truncated:
                y, t0, log_q = truncated_normal_dequantization(
                    sde, batch, truncation, dequantized_grid=dequantized_grid, generator=generator)
                log_py, info = ode_log_likelihood(model, sde, y, generator=generator, eps=t0,
                                                  **ode_options)
                bits = (log_q.to(log_py.device) - log_py) / (dims * math.log(2.0))
            else:
                x = uint8_to_float(batch, dequantize=True, generator=generator)
                log_px, info = ode_log_likelihood(model, sde, x, generator=generator, **ode_options)
                bits = dequantized_bits_per_dim(log_px, dims)
            per_image[start:start + batch_size, repeat] = bits.cpu()
            nfe += info["nfe"]
    mean, standard_error, estimator = mean_and_standard_error(per_image)
    return mean, standard_error, {"per_image": per_image, "nfe": nfe, "t0": t0,
                                  "estimator_standard_error": estimator}


# ---- ELBOs -----------------------------------------------------------------------------
#: The importance proposal over log-SNR: PROPOSAL_BINS equal bins, fitted by a pilot on up to
#: PILOT_IMAGES images (one network call per bin), with DEFENSIVE_FRACTION of its mass
#: spread like the base measure so that no region the pilot underrates is starved.
PROPOSAL_BINS = 32
PILOT_IMAGES = 32
DEFENSIVE_FRACTION = 0.1


def _stratified_uniform(batch: int, num_times: int, generator: torch.Generator | None,
                        device: torch.device) -> Tensor:
    """[batch, num_times] points in [0, 1), one uniform in each stratum [k/K, (k+1)/K)."""
    offsets = torch.rand(batch, num_times, generator=generator, dtype=torch.float64,
                         device=_generator_device(generator, device)).to(device)
    return (torch.arange(num_times, dtype=torch.float64, device=device) + offsets) / num_times


class LogSnrProposal:
    """Importance sampling and control variates for the diffusion term int h dmu of an ELBO.

    The base measure mu is d lambda on [lambda(T), lambda(eps)] for the continuous bound
    (``continuous``) and sum_i w_i delta(lambda - lambda_i) over the DDPM steps i = 2..N
    (``ddpm``). Equal bins of lambda carry probability ``mass``; inside a bin a draw
    follows mu, so the estimate of the integral is h(lambda) mu(bin) / mass(bin).

    h is estimated by ||z - eps_theta||^2 - c (||z||^2 - D): since E||z||^2 = D, any c
    fixed per bin keeps the mean, and c = Cov(||z - eps_theta||^2, ||z||^2) / Var(||z||^2)
    removes the chi-square noise that dominates where eps_theta hardly depends on z.

    Unfitted: mass proportional to mu (uniform lambda; steps with probability proportional
    to w_i) and c = 0. ``fit`` runs a pilot of one draw per bin and sample: c from the
    pilot's regression in each bin, clipped to [0, 1] (the range of the optimum
    (1 - a)^2 for eps_theta = a z + const; a noisy pilot regression, as where the
    integrand varies much between images, must not add noise), and mass proportional to
    mu(bin) times the root mean square of the controlled integrand (the minimiser of the
    estimator's second moment over piecewise-constant proposals), mixed with
    DEFENSIVE_FRACTION of the base measure.
    """

    def __init__(self, edges: Tensor, base: Tensor, step_log_snr: Tensor | None = None,
                 step_weights: Tensor | None = None):
        self.edges, self.base = edges, base
        self.step_weights = step_weights
        self.step_bins = (None if step_log_snr is None else
                          torch.bucketize(step_log_snr, edges[1:-1]).clamp(max=base.numel() - 1))
        self.mass = base / base.sum()
        self.control = torch.zeros_like(base)

    @classmethod
    def continuous(cls, log_snr_low: Tensor, log_snr_high: Tensor) -> LogSnrProposal:
        edges = torch.linspace(log_snr_low.item(), log_snr_high.item(), PROPOSAL_BINS + 1,
                               dtype=torch.float64, device=log_snr_low.device)
        return cls(edges, edges.diff())

    @classmethod
    def ddpm(cls, step_log_snr: Tensor, step_weights: Tensor) -> LogSnrProposal:
        edges = torch.linspace(step_log_snr.min().item(), step_log_snr.max().item(),
                               PROPOSAL_BINS + 1, dtype=torch.float64, device=step_log_snr.device)
        bins = torch.bucketize(step_log_snr, edges[1:-1]).clamp(max=PROPOSAL_BINS - 1)
        base = torch.zeros(PROPOSAL_BINS, dtype=torch.float64, device=edges.device)
        return cls(edges, base.index_add(0, bins, step_weights), step_log_snr, step_weights)

    def draw(self, uniforms: Tensor, mass: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inverse-CDF draws for ``uniforms`` in [0, 1): (lambda, or the step index into
        the weights, for the DDPM bound) and the importance weight dmu/dq of each."""
        mass = self.mass if mass is None else mass
        if self.step_weights is None:
            cdf = torch.cumsum(mass, 0)
            bins = torch.searchsorted(cdf, uniforms.contiguous(), right=True).clamp(max=mass.numel() - 1)
            within = ((uniforms - (cdf[bins] - mass[bins])) / mass[bins]).clamp(0.0, 1.0)
            width = self.edges.diff()[bins]
            return self.edges[bins] + within * width, self.base[bins] / mass[bins]
        probabilities = mass[self.step_bins] * self.step_weights / self.base[self.step_bins]
        cdf = torch.cumsum(probabilities, 0) / probabilities.sum()
        steps = torch.searchsorted(cdf, uniforms.contiguous(), right=True).clamp(max=cdf.numel() - 1)
        return steps, self.step_weights[steps] / probabilities[steps]

    def bin_of(self, points: Tensor) -> Tensor:
        """The bin of each drawn point (lambda, or step index)."""
        if self.step_bins is not None:
            return self.step_bins[points]
        return torch.bucketize(points, self.edges[1:-1]).clamp(max=self.base.numel() - 1)

    def controlled(self, points: Tensor, error: Tensor, chi_square: Tensor) -> Tensor:
        """||z - eps_theta||^2 - c(bin) (||z||^2 - D), given ``chi_square`` = ||z||^2 - D."""
        return error - self.control[self.bin_of(points)] * chi_square

    def fit(self, integrand: Callable[[Tensor], tuple[Tensor, Tensor]], pilot_size: int,
            generator: torch.Generator | None) -> None:
        """Fit c and the mass from ``integrand(points) -> (||z - eps||^2, ||z||^2 - D)``
        evaluated at one point per bin for each of ``pilot_size`` pilot samples."""
        occupied = self.base > 0
        count = int(occupied.sum())
        pilot_mass = occupied.double() / count
        ranks = torch.cumsum(occupied.long(), 0) - 1
        offsets = torch.rand(pilot_size, self.base.numel(), generator=generator, dtype=torch.float64,
                             device=_generator_device(generator, self.base.device)).to(self.base.device)
        root_mean_square = torch.zeros_like(self.base)
        for j in torch.nonzero(occupied).flatten().tolist():
            points, _ = self.draw((ranks[j] + offsets[:, j]) / count, pilot_mass)
            error, chi_square = integrand(points)
            regression = (error * chi_square).sum() / chi_square.pow(2).sum().clamp_min(1e-300)
            self.control[j] = regression.clamp(0.0, 1.0)
            root_mean_square[j] = (error - self.control[j] * chi_square).pow(2).mean().sqrt()
        fitted = self.base * root_mean_square
        if fitted.sum() > 0:
            fitted = fitted / fitted.sum()
            self.mass = (1 - DEFENSIVE_FRACTION) * fitted + DEFENSIVE_FRACTION * self.base / self.base.sum()


def _noise_errors(model: _CountedModel, alpha: Tensor, sigma: Tensor, t: Tensor, x0: Tensor,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(||z - eps_theta(alpha x0 + sigma z, t)||^2, ||z||^2 - D) per sample, z ~ N(0, I)."""
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64,
                        device=_generator_device(generator, x0.device)).to(x0.device)
    x_t = broadcast_to(alpha, x0) * x0 + broadcast_to(sigma, x0) * noise
    with torch.no_grad():
        eps = model(x_t, t).double()
    return ((noise - eps).pow(2).flatten(1).sum(1),
            noise.flatten(1).pow(2).sum(1) - x0[0].numel())


def _diffusion_term(integrand: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                    proposal: LogSnrProposal, x0: Tensor, num_times: int,
                    generator: torch.Generator | None) -> Tensor:
    """Estimate of int h dmu per sample from ``num_times`` stratified draws of ``proposal``;
    ``integrand(points, x0)`` gives ``_noise_errors`` at one point per sample."""
    uniforms = _stratified_uniform(x0.shape[0], num_times, generator, x0.device)
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for k in range(num_times):
        points, weights = proposal.draw(uniforms[:, k])
        total += weights * proposal.controlled(points, *integrand(points, x0)) / num_times
    return total


def gaussian_kl_to_prior_per_dim(mean: Tensor, std: Tensor, prior_std: float) -> Tensor:
    """KL(N(mean, std^2) || N(0, prior_std^2)) of every element of ``mean``; std a scalar tensor."""
    variance_ratio = std ** 2 / prior_std ** 2
    return 0.5 * (variance_ratio - 1.0 - torch.log(variance_ratio) + mean.pow(2) / prior_std ** 2)


def _gaussian_kl_to_prior(mean: Tensor, std: Tensor, prior_std: float) -> Tensor:
    """KL(N(mean, std^2 I) || N(0, prior_std^2 I)) per sample; std a scalar tensor."""
    return gaussian_kl_to_prior_per_dim(mean, std, prior_std).flatten(1).sum(1)


def continuous_reconstruction_per_dim(log_snr_eps: float) -> float:
    """The continuous bound's reconstruction term per dimension in nats, log(2 pi)/2 + 1/2 -
    lambda(eps) (module docstring)."""
    return 0.5 * math.log(2 * math.pi) + 0.5 - log_snr_eps


def _check_num_times(num_times: int) -> None:
    if num_times < 1:
        raise ValueError(f"num_times must be >= 1, got {num_times}")


def continuous_negative_elbo(model: Model, sde: SDE, x: Tensor, *, eps: float = DEFAULT_EPS,
                             num_times: int = 1, generator: torch.Generator | None = None,
                             proposal: LogSnrProposal | None = None) -> tuple[Tensor, dict]:
    """Upper bound on -log p(x) in nats per sample [B] for continuous x (module docstring:
    Kingma et al. 2021 eq. 17 in eps and log-SNR form; Song et al. 2021b Thm 1).

    The diffusion integral is estimated from ``num_times`` stratified draws of lambda per
    sample from ``proposal`` (default: one fitted by a pilot on the first PILOT_IMAGES of
    x). info has the "prior", "reconstruction" and "diffusion" parts [B], the
    "proposal" used and "nfe" (network calls, the pilot's included).
    """
    _check_eps(sde, eps)
    _check_num_times(num_times)
    dtype, device = _model_dtype_device(model, x)
    x = x.to(device=device, dtype=torch.float64)
    dims = x[0].numel()
    counted = _CountedModel(model, dtype)
    ends = torch.tensor([eps, sde.T], dtype=torch.float64, device=device)
    log_snr_eps, log_snr_T = sde.log_snr(ends)
    alpha_T, sigma_T = sde.alpha(ends[1]), sde.sigma(ends[1])

    def integrand(log_snr: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        t = sde.t_from_log_snr(log_snr)
        return _noise_errors(counted, sde.alpha(t), sde.sigma(t), t, x0, generator)

    if proposal is None:
        proposal = LogSnrProposal.continuous(log_snr_T, log_snr_eps)
        pilot = x[:PILOT_IMAGES]
        proposal.fit(lambda points: integrand(points, pilot), pilot.shape[0], generator)
    prior = _gaussian_kl_to_prior(alpha_T * x, sigma_T, sde.prior_std)
    reconstruction = torch.full_like(prior, dims * continuous_reconstruction_per_dim(log_snr_eps.item()))
    diffusion = _diffusion_term(integrand, proposal, x, num_times, generator)
    info = {"prior": prior, "reconstruction": reconstruction, "diffusion": diffusion,
            "proposal": proposal, "nfe": counted.calls}
    return prior + reconstruction + diffusion, info


def _log_normal_cdf_difference(lower: Tensor, upper: Tensor) -> Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, stable in both tails."""
    flip = lower > 0  # in the upper tail use Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    high = torch.where(flip, -lower, upper)
    low = torch.where(flip, -upper, lower)
    log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
    gap = log_low - log_high  # <= 0
    return log_high + torch.where(gap > -math.log(2.0), torch.log(-torch.expm1(gap)),
                                  torch.log1p(-torch.exp(gap)))


def discretized_gaussian_log_likelihood(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log P(u) per sample under the discretized Gaussian decoder (Ho et al. 2020, eq. 13).

    Pixel u has the bin [x - delta, x + delta] around x = 2u/255 - 1 (delta = PLAIN_SLOPE/2),
    widened to -inf for u = 0 and +inf for u = 255; ``std`` broadcasts against ``mean``.
    """
    x0, half_width = uint8_to_float(images, dequantize=False).double(), PLAIN_SLOPE / 2
    lower = torch.where(images == 0, torch.full_like(x0, -math.inf), x0 - half_width)
    upper = torch.where(images == MAX_PIXEL_VALUE, torch.full_like(x0, math.inf), x0 + half_width)
    log_prob = _log_normal_cdf_difference((lower - mean) / std, (upper - mean) / std)
    return log_prob.flatten(1).sum(1)


def ddpm_negative_elbo(model: Model, sde: SDE, images: Tensor, *, num_times: int = 1,
                       generator: torch.Generator | None = None,
                       proposal: LogSnrProposal | None = None) -> tuple[Tensor, dict]:
    """Upper bound on -log P(u) in nats per image [B] for uint8 pixels: the DDPM variational
    bound of Ho et al. 2020, eq. 5 (module docstring), for models trained on the discrete
    steps (network fed t_i = T i / N).

    sum_{i>=2} L_{i-1} is estimated from ``num_times`` stratified draws of the step from
    ``proposal`` (default: fitted by a pilot on the first PILOT_IMAGES images); info has
    "prior" (L_N), "diffusion" (the sum), "reconstruction" (L_0), each [B], the
    "proposal" and "nfe".
    """
    _check_images(images)
    if not sde.supports_ddpm_betas():
        raise ValueError(f"the DDPM bound needs an SDE with DDPM beta tables (VPSDE), got {sde!r}")
    _check_num_times(num_times)
    dtype, device = _model_dtype_device(model, images)
    images = images.to(device)
    x0 = uint8_to_float(images, dequantize=False).double()
    counted = _CountedModel(model, dtype)
    betas, alpha_bar = sde.betas.to(device), sde.alphas_cumprod.to(device)
    alpha, sigma = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    times = sde.discrete_times.to(device)

    def integrand(index: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        step = index + 1  # the proposal indexes steps i = 2..N
        return _noise_errors(counted, alpha[step], sigma[step], times[step], x, generator)

    if proposal is None:
        weights = betas[1:] / (2.0 * (1.0 - betas[1:]) * (1.0 - alpha_bar[:-1]))  # w_i, i >= 2
        proposal = LogSnrProposal.ddpm(torch.log(alpha[1:] / sigma[1:]), weights)
        pilot = x0[:PILOT_IMAGES]
        proposal.fit(lambda points: integrand(points, pilot), pilot.shape[0], generator)
    prior = _gaussian_kl_to_prior(alpha[-1] * x0, sigma[-1], 1.0)
    diffusion = _diffusion_term(integrand, proposal, x0, num_times, generator)

    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64,
                        device=_generator_device(generator, device)).to(device)
    x1 = alpha[0] * x0 + sigma[0] * noise
    with torch.no_grad():
        eps = counted(x1, times[0]).double()
    decoder_mean = (x1 - sigma[0] * eps) / alpha[0]
    posterior_variance_2 = betas[1] * (1.0 - alpha_bar[0]) / (1.0 - alpha_bar[1])
    reconstruction = -discretized_gaussian_log_likelihood(images, decoder_mean,
                                                          posterior_variance_2.sqrt())
    info = {"prior": prior, "reconstruction": reconstruction, "diffusion": diffusion,
            "proposal": proposal, "nfe": counted.calls}
    return prior + diffusion + reconstruction, info


def elbo_bits_per_dim(model: Model, sde: SDE, images: Tensor, *, continuous: bool = True,
                      repeats: int = 1, generator: torch.Generator | None = None,
                      num_times: int = 1, eps: float = DEFAULT_EPS, batch_size: int = 128,
                      proposal: LogSnrProposal | None = None) -> tuple[float, float, dict]:
    """ELBO bits/dim of uint8 images: (mean, standard error, info).

    ``continuous=True``: the continuous-time bound on dequantized images, converted by
    ``dequantized_bits_per_dim``. ``continuous=False``: the DDPM bound on the pixel pmf
    directly, bits/dim = nats / (D ln 2). Each of ``repeats`` passes redraws all noise.
    info has "per_image" [N, repeats], the mean bits/dim of each part ("prior",
    "diffusion", "reconstruction"), "estimator_standard_error", "nfe" and the
    "proposal" (fitted on the first batch, then reused; pass it back to reuse it).
    """
    _check_images(images)
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats}, {batch_size}")
    dims = images[0].numel()
    nats_to_bits = 1.0 / (dims * math.log(2.0))
    per_image = torch.empty(images.shape[0], repeats, dtype=torch.float64)
    parts = {"prior": 0.0, "diffusion": 0.0, "reconstruction": 0.0}
    nfe = 0  # without a proposal, the first batch fits one and the rest reuse it
    for repeat in range(repeats):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]
            if continuous:
                x = uint8_to_float(batch, dequantize=True, generator=generator)
                nats, info = continuous_negative_elbo(model, sde, x, eps=eps, num_times=num_times,
                                                      generator=generator, proposal=proposal)
                bits = dequantized_bits_per_dim(-nats, dims)
                # the Jacobian, booked with the decoder term
                info["reconstruction"] = info["reconstruction"] - dims * math.log(DEQUANTIZED_SLOPE)
            else:
                nats, info = ddpm_negative_elbo(model, sde, batch, num_times=num_times,
                                                generator=generator, proposal=proposal)
                bits = nats * nats_to_bits
            proposal = info["proposal"]
            per_image[start:start + batch_size, repeat] = bits.cpu()
            for name in parts:
                parts[name] += info[name].sum().item() * nats_to_bits
            nfe += info["nfe"]
    mean, standard_error, estimator = mean_and_standard_error(per_image)
    total = images.shape[0] * repeats
    return mean, standard_error, {"per_image": per_image, "nfe": nfe, "proposal": proposal,
                                  "estimator_standard_error": estimator,
                                  **{name: value / total for name, value in parts.items()}}
