"""Log-likelihood by the probability-flow ODE, and bits/dim of 8-bit images from it.

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
like 1/alpha at low SNR, which makes the adaptive solver take more steps.
``bench/likelihood_speed.py`` measures error against cost for both variables; the
defaults below are the best point of its table (BENCHMARKS.md).

The divergence of eps_theta is either exact (one vector-Jacobian product per dimension,
for low dimensions) or the Hutchinson-Skilling estimate v^T (d eps / dx) v with one probe
v (Rademacher or Gaussian) drawn once per solve and held fixed along the path, which makes
the integrated estimate unbiased for the integrated trace.
"""
from __future__ import annotations

import math

import torch

from sde.data import uint8_to_float
from sde import conditioning, randomness
from sde.likelihood.common import (DEFAULT_EPS, CountedModel, Model, check_choice, check_eps, check_images,
                                   counted_network, mean_and_standard_error)
from sde.likelihood.dequantization import (DEFAULT_TRUNCATION, DEQUANTIZATIONS, dequantized_bits_per_dim,
                                           truncated_normal_dequantization, truncation_time)
from sde.sdes import SDE

Tensor = torch.Tensor

DIVERGENCES = ("rademacher", "gaussian", "exact")
VARIABLES = ("t", "log_snr")
#: torchdiffeq's solvers with error control (the likelihood needs a controlled error).
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: The best point of bench/likelihood_speed.py's error-versus-cost table (BENCHMARKS.md):
#: the fewest evaluations for an error well below the images' spread of bits/dim.
DEFAULT_VARIABLE = "log_snr"
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4


def _draw_probe(divergence: str, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """One Hutchinson probe per sample, E[v v^T] = I: Rademacher signs or N(0, I) (float64)."""
    if divergence == "rademacher":
        signs = randomness.randint(0, 2, like.shape, generator=generator, device=like.device)
        return 2.0 * signs.double() - 1.0
    return randomness.randn(like.shape, generator=generator, device=like.device, dtype=torch.float64)


class _AugmentedFlow:
    """Right-hand side of the augmented state (x, delta-logp) in the integration variable s:
    eq. (t) of the module docstring for s = t, eq. (lambda) for s = log-SNR, with
    d delta / ds = div_x (dx/ds).
    """

    def __init__(self, model: CountedModel, sde: SDE, variable: str, divergence: str,
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
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("variable", variable, VARIABLES)
    check_choice("method", method, ADAPTIVE_METHODS)
    check_eps(sde, eps)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    counted, device = counted_network(model, x)
    x = x.to(device=device, dtype=torch.float64)
    if divergence != "exact":
        if probe is None:
            probe = _draw_probe(divergence, x, generator)
        elif probe.shape != x.shape:
            raise ValueError(f"probe must have the shape of x {list(x.shape)}, got {list(probe.shape)}")
        probe = probe.to(device=device, dtype=torch.float64)
    flow = _AugmentedFlow(counted, sde, variable, divergence, probe)

    ends = torch.tensor([eps, sde.T], dtype=torch.float64, device=device)
    span = ends if variable == "t" else sde.log_snr(ends)
    delta0 = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
    # step_t: land on the end point instead of stepping past it and interpolating back
    # (beyond T the schedule may not exist, e.g. the cosine VP's beta diverges)
    options = {"step_t": span[1:], **(options or {})}
    import torchdiffeq  # here, not at import: it loads scipy (start-up time)

    with torch.no_grad():
        states, deltas = torchdiffeq.odeint(flow, (x, delta0), span, rtol=rtol, atol=atol,
                                            method=method, options=options)
    x_T, delta_logp = states[-1], deltas[-1]
    prior_logp = sde.prior_logp(x_T)
    info = {"nfe": counted.nfe, "prior_logp": prior_logp, "delta_logp": delta_logp,
            "x_T": x_T, "variable": variable, "method": method, "rtol": rtol, "atol": atol}
    return prior_logp + delta_logp, info


def bits_per_dim(model: Model, sde: SDE, images: Tensor, *, repeats: int = 1,
                 generator: torch.Generator | None = None, batch_size: int = 128,
                 dequantization: str = "uniform", truncation: float = DEFAULT_TRUNCATION,
                 dequantized_grid: bool = False, labels: Tensor | None = None,
                 **ode_options) -> tuple[float, float, dict]:
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
    and info["t0"], the time the ODE starts at. ``labels`` (one per image) condition a
    class-conditional network on each image's class: -log2 P(x | y) / D (``sde.conditioning``).
    """
    check_images(images)
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    check_choice("dequantization", dequantization, DEQUANTIZATIONS)
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
            model_of_batch = model if labels is None else conditioning.bind(model, labels[start:start + batch_size])
            if truncated:
                y, t0, log_q = truncated_normal_dequantization(
                    sde, batch, truncation, dequantized_grid=dequantized_grid, generator=generator)
                log_py, info = ode_log_likelihood(model_of_batch, sde, y, generator=generator, eps=t0,
                                                  **ode_options)
                bits = (log_q.to(log_py.device) - log_py) / (dims * math.log(2.0))
            else:
                x = uint8_to_float(batch, dequantize=True, generator=generator)
                log_px, info = ode_log_likelihood(model_of_batch, sde, x, generator=generator, **ode_options)
                bits = dequantized_bits_per_dim(log_px, dims)
            per_image[start:start + batch_size, repeat] = bits.cpu()
            nfe += info["nfe"]
    mean, standard_error, estimator = mean_and_standard_error(per_image)
    return mean, standard_error, {"per_image": per_image, "nfe": nfe, "t0": t0,
                                  "estimator_standard_error": estimator}
