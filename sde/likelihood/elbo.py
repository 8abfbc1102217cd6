"""Evidence lower bounds: the continuous-time bound and the discrete DDPM bound.

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

from sde.data import MAX_PIXEL_VALUE, uint8_to_float
from sde import randomness
from sde.likelihood.common import (DEFAULT_EPS, CountedModel, Model, check_eps, check_images, counted_network,
                                   mean_and_standard_error)
from sde.likelihood.dequantization import DEQUANTIZED_SLOPE, PLAIN_SLOPE, dequantized_bits_per_dim
from sde.sdes import SDE, broadcast_to

Tensor = torch.Tensor

#: The importance proposal over log-SNR: PROPOSAL_BINS equal bins, fitted by a pilot on up to
#: PILOT_IMAGES images (one network call per bin), with DEFENSIVE_FRACTION of its mass
#: spread like the base measure so that no region the pilot underrates is starved.
PROPOSAL_BINS = 32
PILOT_IMAGES = 32
DEFENSIVE_FRACTION = 0.1


def _stratified_uniform(batch: int, num_times: int, generator: torch.Generator | None,
                        device: torch.device) -> Tensor:
    """[batch, num_times] points in [0, 1), one uniform in each stratum [k/K, (k+1)/K)."""
    offsets = randomness.rand((batch, num_times), generator=generator, dtype=torch.float64, device=device)
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
        offsets = randomness.rand((pilot_size, self.base.numel()), generator=generator, dtype=torch.float64,
                                  device=self.base.device)
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


def _noise_errors(model: CountedModel, alpha: Tensor, sigma: Tensor, t: Tensor, x0: Tensor,
                  generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(||z - eps_theta(alpha x0 + sigma z, t)||^2, ||z||^2 - D) per sample, z ~ N(0, I)."""
    noise = randomness.randn(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)
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
    check_eps(sde, eps)
    _check_num_times(num_times)
    counted, device = counted_network(model, x)
    x = x.to(device=device, dtype=torch.float64)
    dims = x[0].numel()
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
            "proposal": proposal, "nfe": counted.nfe}
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
    check_images(images)
    if not sde.supports_ddpm_betas():
        raise ValueError(f"the DDPM bound needs an SDE with DDPM beta tables (VPSDE), got {sde!r}")
    _check_num_times(num_times)
    counted, device = counted_network(model, images)
    images = images.to(device)
    x0 = uint8_to_float(images, dequantize=False).double()
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

    noise = randomness.randn(x0.shape, generator=generator, dtype=torch.float64, device=device)
    x1 = alpha[0] * x0 + sigma[0] * noise
    with torch.no_grad():
        eps = counted(x1, times[0]).double()
    decoder_mean = (x1 - sigma[0] * eps) / alpha[0]
    posterior_variance_2 = betas[1] * (1.0 - alpha_bar[0]) / (1.0 - alpha_bar[1])
    reconstruction = -discretized_gaussian_log_likelihood(images, decoder_mean,
                                                          posterior_variance_2.sqrt())
    info = {"prior": prior, "reconstruction": reconstruction, "diffusion": diffusion,
            "proposal": proposal, "nfe": counted.nfe}
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
    check_images(images)
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
