"""Likelihoods against closed forms: exact-eps models of Gaussian (mixture) data.

For data N(mu, Sigma) the marginal of x_t = alpha x_0 + sigma z is N(alpha mu, C_t) with
C_t = alpha^2 Sigma + sigma^2 I, so the exact noise prediction is
eps*(x, t) = -sigma grad log p_t(x) = sigma C_t^{-1} (x - alpha mu)   (diagonal Sigma = s^2:
sigma (x - alpha mu) / (alpha^2 s^2 + sigma^2) elementwise). With it the probability-flow
ODE is exact, so log p_eps(x) = log p_T(x_T) + delta_logp, and the ODE's answer with the
N(0, prior_std^2) prior is log p_eps(x) - log p_T(x_T) + log pi(x_T).
"""
from __future__ import annotations

import math

import pytest
import torch

from sde import likelihood
from sde.data import uint8_to_float
from sde.models.mlp import ToyMLP
from sde.sdes import VESDE, VPSDE, SubVPSDE

DTYPE = torch.float64
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "vp_cosine": lambda: VPSDE(schedule="cosine")}
TIGHT = dict(rtol=1e-8, atol=1e-8)


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: one thread avoids contention overhead on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def continuous_schedule(sde):
    return lambda t: (sde.alpha(t), sde.sigma(t))


def ddpm_schedule(sde):
    """alpha_i, sigma_i of the DDPM tables at the step whose time t_i = T i / N is given."""
    alpha, sigma = sde.discrete_alpha_sigma()

    def schedule(t):
        step = torch.round(t / sde.T * sde.N).long() - 1
        return alpha[step], sigma[step]
    return schedule


class GaussianEps:
    """Exact eps for data N(mean, cov) on flattened x of any shape [B, ...]."""

    def __init__(self, schedule, mean: torch.Tensor, cov: torch.Tensor):
        self.schedule, self.mean, self.cov = schedule, mean.to(DTYPE), cov.to(DTYPE)

    def marginal(self, t: torch.Tensor):
        alpha, sigma = self.schedule(t)
        eye = torch.eye(self.mean.numel(), dtype=DTYPE)
        cov_t = alpha[:, None, None] ** 2 * self.cov + sigma[:, None, None] ** 2 * eye
        return alpha[:, None] * self.mean, cov_t, sigma

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mean_t, cov_t, sigma = self.marginal(t.to(DTYPE))
        residual = x.flatten(1).to(DTYPE) - mean_t
        eps = sigma[:, None] * torch.linalg.solve(cov_t, residual)
        return eps.reshape(x.shape).to(x.dtype)

    def log_density(self, x: torch.Tensor, t: float) -> torch.Tensor:
        mean_t, cov_t, _ = self.marginal(torch.full((x.shape[0],), t, dtype=DTYPE))
        return torch.distributions.MultivariateNormal(mean_t, cov_t).log_prob(x.flatten(1))

    def data_log_density(self, x: torch.Tensor) -> torch.Tensor:
        return torch.distributions.MultivariateNormal(self.mean, self.cov).log_prob(x.flatten(1))


class MixtureEps:
    """Exact eps for the isotropic mixture sum_k w_k N(mu_k, s_k^2 I) on x [B, D]."""

    def __init__(self, schedule, weights, means, stds):
        self.schedule = schedule
        self.log_weights = torch.log(torch.as_tensor(weights, dtype=DTYPE))
        self.means = torch.as_tensor(means, dtype=DTYPE)
        self.stds = torch.as_tensor(stds, dtype=DTYPE)

    def _components(self, x, t):
        alpha, sigma = (v[:, None] for v in self.schedule(t))
        variance = alpha ** 2 * self.stds ** 2 + sigma ** 2                     # [B, K]
        residual = x[:, None, :] - alpha[:, :, None] * self.means                # [B, K, D]
        dims = x.shape[1]
        log_joint = (self.log_weights - 0.5 * dims * torch.log(2 * math.pi * variance)
                     - 0.5 * residual.pow(2).sum(-1) / variance)
        return log_joint, residual, variance, sigma

    def __call__(self, x, t):
        log_joint, residual, variance, sigma = self._components(x.to(DTYPE), t.to(DTYPE))
        responsibility = torch.softmax(log_joint, 1)
        score = -(responsibility[:, :, None] * residual / variance[:, :, None]).sum(1)
        return (-sigma * score).to(x.dtype)

    def log_density(self, x, t: float):
        log_joint, *_ = self._components(x, torch.full((x.shape[0],), t, dtype=DTYPE))
        return torch.logsumexp(log_joint, 1)


def expected_ode_logp(model, sde, x, info, eps):
    """log p_eps(x) corrected for the prior: the exact ODE's answer (module docstring)."""
    return (model.log_density(x, eps) - model.log_density(info["x_T"], sde.T)
            + sde.prior_logp(info["x_T"]))


def full_cov_gaussian(dims: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    factor = 0.3 * torch.randn(dims, dims, generator=generator, dtype=DTYPE)
    cov = factor @ factor.T + 0.05 * torch.eye(dims, dtype=DTYPE)
    mean = 0.5 * torch.randn(dims, generator=generator, dtype=DTYPE)
    return mean, cov


def sample_gaussian(mean, cov, count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(count, mean.numel(), generator=generator, dtype=DTYPE)
    return mean + z @ torch.linalg.cholesky(cov).T


# ---- probability-flow ODE ---------------------------------------------------------------
@pytest.mark.parametrize("variable", likelihood.VARIABLES)
@pytest.mark.parametrize("sde_name", [name if name == "vp" else pytest.param(name, marks=pytest.mark.slow)
                                      for name in SDES])
def test_exact_divergence_matches_closed_form_gaussian(sde_name, variable):
    sde = SDES[sde_name]()
    mean, cov = full_cov_gaussian(3)
    model = GaussianEps(continuous_schedule(sde), mean, cov)
    x = sample_gaussian(mean, cov, 6)
    eps = 1e-5
    logp, info = likelihood.ode_log_likelihood(model, sde, x, divergence="exact", eps=eps,
                                               variable=variable, **TIGHT)
    torch.testing.assert_close(logp, expected_ode_logp(model, sde, x, info, eps),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(logp, info["prior_logp"] + info["delta_logp"])
    # p_T differs from the prior by O(alpha_T |mean|) per dimension (alpha_T = 0.0066 for
    # VP) and p_eps from p_0 by a blur of sigma(eps) (0.01 for VE), so this is also the
    # data's own log-density up to a few 1e-2
    torch.testing.assert_close(logp, model.data_log_density(x), rtol=0, atol=5e-2)


@pytest.mark.parametrize("variable", likelihood.VARIABLES)
def test_exact_divergence_matches_closed_form_mixture(variable):
    """A curved flow: a two-component mixture, where the ODE is genuinely nonlinear."""
    sde = VPSDE()
    model = MixtureEps(continuous_schedule(sde), [0.3, 0.7], [[-0.6, 0.2], [0.5, -0.3]], [0.15, 0.3])
    x = torch.tensor([[-0.6, 0.25], [0.4, -0.2], [0.0, 0.0], [0.9, 0.6]], dtype=DTYPE)
    logp, info = likelihood.ode_log_likelihood(model, sde, x, divergence="exact",
                                               variable=variable, **TIGHT)
    torch.testing.assert_close(logp, expected_ode_logp(model, sde, x, info, 1e-5),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("divergence", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_its_standard_error(divergence):
    sde = VPSDE()
    mean, cov = full_cov_gaussian(4, seed=3)
    model = GaussianEps(continuous_schedule(sde), mean, cov)
    probes = 64  # the same point repeated: each row draws its own fixed probe
    x = sample_gaussian(mean, cov, 1, seed=4).expand(probes, -1)
    logp, info = likelihood.ode_log_likelihood(model, sde, x, divergence=divergence,
                                               generator=torch.Generator().manual_seed(0),
                                               rtol=1e-7, atol=1e-7)
    exact = expected_ode_logp(model, sde, x, info, 1e-5)
    standard_error = logp.std() / math.sqrt(probes)
    assert standard_error > 1e-3  # the probes do fluctuate (non-diagonal Jacobian)
    assert abs(logp.mean() - exact.mean()) < 4 * standard_error


def test_probe_is_fixed_by_the_generator_or_given():
    sde = VPSDE()
    mean, cov = full_cov_gaussian(3)
    model = GaussianEps(continuous_schedule(sde), mean, cov)
    x = sample_gaussian(mean, cov, 4)
    first, _ = likelihood.ode_log_likelihood(model, sde, x, generator=torch.Generator().manual_seed(7))
    again, _ = likelihood.ode_log_likelihood(model, sde, x, generator=torch.Generator().manual_seed(7))
    probe = 2.0 * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(7)).double() - 1
    given, _ = likelihood.ode_log_likelihood(model, sde, x, probe=probe)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, given, rtol=0, atol=0)


@pytest.mark.parametrize("divergence", likelihood.DIVERGENCES)
def test_nfe_counts_every_network_evaluation(divergence):
    sde = VPSDE()
    mean, cov = full_cov_gaussian(3)
    exact = GaussianEps(continuous_schedule(sde), mean, cov)
    calls = []

    def counting_model(x, t):
        calls.append(x.shape[0])
        return exact(x, t)

    _, info = likelihood.ode_log_likelihood(counting_model, sde, sample_gaussian(mean, cov, 5),
                                            divergence=divergence)
    assert info["nfe"] == len(calls) > 10
    assert set(calls) == {5}  # one batched call per evaluation, also for the exact divergence


@pytest.mark.parametrize("variable", likelihood.VARIABLES)
def test_zero_output_network_gives_the_linear_flow(variable):
    """A float32 nn.Module: the ToyMLP predicts eps = 0 at initialisation, so the flow is
    dx/dt = f(t) x: x_T = x alpha_T / alpha_eps and delta-logp = D log(alpha_T / alpha_eps)."""
    torch.manual_seed(0)
    network = ToyMLP(hidden=16, num_layers=1).eval()
    sde, eps = VPSDE(), 1e-5
    x = torch.tensor([[0.3, -0.5], [1.0, 0.2], [-0.4, -0.9]])
    logp, info = likelihood.ode_log_likelihood(network, sde, x, variable=variable, eps=eps,
                                               generator=torch.Generator().manual_seed(0),
                                               **TIGHT)
    ends = torch.tensor([eps, sde.T], dtype=DTYPE)
    ratio = sde.alpha(ends[1]) / sde.alpha(ends[0])
    x_T = ratio * x.double()
    torch.testing.assert_close(info["x_T"], x_T, rtol=1e-5, atol=0)
    torch.testing.assert_close(logp, sde.prior_logp(x_T) + 2 * torch.log(ratio), rtol=1e-7, atol=0)


def test_bad_arguments_raise_value_errors():
    sde = VPSDE()
    model = GaussianEps(continuous_schedule(sde), torch.zeros(2), torch.eye(2))
    x = torch.zeros(3, 2, dtype=DTYPE)
    with pytest.raises(ValueError, match="divergence"):
        likelihood.ode_log_likelihood(model, sde, x, divergence="hutchinson")
    with pytest.raises(ValueError, match="variable"):
        likelihood.ode_log_likelihood(model, sde, x, variable="sigma")
    with pytest.raises(ValueError, match="eps"):
        likelihood.ode_log_likelihood(model, sde, x, eps=0.0)
    with pytest.raises(ValueError, match="probe"):
        likelihood.ode_log_likelihood(model, sde, x, probe=torch.ones(3, 3))
    with pytest.raises(ValueError, match="uint8"):
        likelihood.bits_per_dim(model, sde, x)
    with pytest.raises(ValueError, match="DDPM"):
        likelihood.ddpm_negative_elbo(model, VESDE(), torch.zeros(3, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="eval"):
        likelihood.ode_log_likelihood(ToyMLP(hidden=8, num_layers=1), sde, x.float())


# ---- bits/dim ---------------------------------------------------------------------------
def test_jacobian_constants_match_the_data_scaling():
    """The slopes the bits/dim conversion and the DDPM decoder use are sde.data's."""
    pixels = torch.arange(255, dtype=torch.uint8)[None]
    lower = uint8_to_float(pixels, dequantize=True, generator=torch.Generator().manual_seed(0))
    upper = uint8_to_float(pixels + 1, dequantize=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((upper - lower).double(),
                               torch.full((1, 255), likelihood.DEQUANTIZED_SLOPE, dtype=DTYPE))
    plain = uint8_to_float(pixels, dequantize=False).double()
    torch.testing.assert_close(plain.diff(), torch.full((1, 254), likelihood.PLAIN_SLOPE, dtype=DTYPE))


def test_bits_per_dim_change_of_variables_by_hand():
    """Model: exact eps for x ~ N(0, s^2 I) in the model's range, on 1x2x2 'images'.

    By hand: w = u + v in [0, 256)^D maps to x = w / 128 - 1, so p_w(w) = p_x(x) / 128^D and
    bits/dim = E_v[-log2 p_x(x)] / D + log2(128). Per pixel, x is uniform on [a, b] with
    a = u/128 - 1, b = a + 1/128, so E[x^2] = (a^2 + ab + b^2) / 3, and the ODE's density is
    the eps-marginal N(0, var) with var = alpha_eps^2 s^2 + sigma_eps^2.
    """
    sde, std, eps = VPSDE(), 0.1, 1e-5
    dims = 4
    model = GaussianEps(continuous_schedule(sde), torch.zeros(dims), std ** 2 * torch.eye(dims))
    images = torch.randint(110, 146, (24, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    # the Jacobian of eps* is diagonal, where a Rademacher probe gives the trace exactly
    mean, standard_error, info = likelihood.bits_per_dim(
        model, sde, images, repeats=4, generator=torch.Generator().manual_seed(1),
        eps=eps, **TIGHT)

    t_eps = torch.tensor(eps, dtype=DTYPE)
    variance = (sde.alpha(t_eps) * std) ** 2 + sde.sigma(t_eps) ** 2
    low = images.double() / 128 - 1
    high = low + 1 / 128
    mean_square = (low ** 2 + low * high + high ** 2) / 3
    nats_per_pixel = 0.5 * torch.log(2 * math.pi * variance) + mean_square / (2 * variance)
    expected = (nats_per_pixel.mean() / math.log(2) + math.log2(128)).item()

    assert 0 < mean < 8  # positive, and better than the uniform 8 bits of a byte
    assert info["per_image"].shape == (24, 4) and info["nfe"] > 0
    assert abs(mean - expected) < 4 * info["estimator_standard_error"] + 1e-4
    assert standard_error > info["estimator_standard_error"] > 0


def test_mean_and_standard_error_match_numpy():
    """values [images, repeats]: images are the independent unit, so the standard error is
    the sample std (ddof = 1) of the per-image means over sqrt(images); with one image, the
    std over the repeats over sqrt(repeats); the estimator standard error is
    sqrt(mean within-image variance (ddof = 1) / (images * repeats)), undefined (nan)
    without repeats, as the standard error is with a single value."""
    values = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=DTYPE) * 3 + 2
    table = values.numpy()
    mean, standard_error, estimator = likelihood.mean_and_standard_error(values)
    assert mean == pytest.approx(table.mean(), rel=1e-12)
    assert standard_error == pytest.approx(table.mean(1).std(ddof=1) / math.sqrt(5), rel=1e-12)
    assert estimator == pytest.approx(math.sqrt(table.var(1, ddof=1).mean() / (5 * 4)), rel=1e-12)

    one_image = values[:1]  # [1, 4]: the spread over the repeats is all there is
    _, standard_error, estimator = likelihood.mean_and_standard_error(one_image)
    assert standard_error == pytest.approx(table[0].std(ddof=1) / math.sqrt(4), rel=1e-12)
    assert estimator == pytest.approx(math.sqrt(table[0].var(ddof=1) / 4), rel=1e-12)

    one_repeat = values[:, :1]  # [5, 1]: no within-image spread to measure
    mean, standard_error, estimator = likelihood.mean_and_standard_error(one_repeat)
    assert mean == pytest.approx(table[:, 0].mean(), rel=1e-12)
    assert standard_error == pytest.approx(table[:, 0].std(ddof=1) / math.sqrt(5), rel=1e-12)
    assert math.isnan(estimator)
    assert math.isnan(likelihood.mean_and_standard_error(values[:1, :1])[1])


@pytest.mark.parametrize("dequantized_grid", [False, True])
def test_truncated_normal_dequantization_bounds_the_exact_pixel_nll(dequantized_grid):
    """1-D pixels from a pmf over the 256 grid values the network 'was trained on', and the
    exact eps of that discrete law (zero-width mixture components at the grid values c_u).

    Then p_t0(y) = sum_v P(v) N(y; alpha c_v, sigma^2) >= P(u) N(y; alpha c_u, sigma^2), so
    every draw's bound log q - log p_t0 is at most -log P(u) - log Z (Z = erf(tau/sqrt 2);
    up to the prior's error, as the ODE ends in N(0, 1), not p_T),
    while its mean is at least -log of the model's pmf, the mass of p_t0 in u's scaled bin:
    P_t0(u) = sum_v P(v) [Phi(tau (1 + 2(u - v))) - Phi(tau (2(u - v) - 1))].
    """
    sde, tau = VPSDE(), 2.0
    levels = torch.arange(256, dtype=DTYPE)
    centers = (levels + 0.5) / 128 - 1 if dequantized_grid else levels * 2 / 255 - 1
    log_pmf = torch.log_softmax(-0.5 * ((centers - 0.1) / 0.3) ** 2, 0)
    model = MixtureEps(continuous_schedule(sde), log_pmf.exp(), centers[:, None], torch.zeros(256))
    images = torch.multinomial(log_pmf.exp(), 300, replacement=True,
                               generator=torch.Generator().manual_seed(0)).to(torch.uint8)[:, None]
    _, _, info = likelihood.bits_per_dim(
        model, sde, images, generator=torch.Generator().manual_seed(1), batch_size=300,
        dequantization="truncated_normal", truncation=tau, dequantized_grid=dequantized_grid,
        divergence="exact", **TIGHT)
    bound = info["per_image"][:, 0] * math.log(2)                                    # nats

    t0 = torch.tensor(info["t0"], dtype=DTYPE)
    half_width = 1 / 256 if dequantized_grid else 1 / 255
    assert sde.log_snr(t0).item() == pytest.approx(math.log(tau / half_width), rel=1e-9)
    u = images[:, 0].long()
    log_z = math.log(math.erf(tau / math.sqrt(2)))
    # the ODE ends in the N(0, 1) prior, not in p_T (alpha_T > 0): bound its log-ratio on |x_T| <= 6
    x_T = torch.linspace(-6, 6, 2001, dtype=DTYPE)[:, None]
    prior_error = (model.log_density(x_T, sde.T) - sde.prior_logp(x_T)).abs().max().item()
    assert (bound <= -log_pmf[u] - log_z + prior_error + 1e-6).all()
    normal = torch.distributions.Normal(torch.zeros((), dtype=DTYPE), torch.ones((), dtype=DTYPE))
    offset = 2 * (levels[:, None] - levels[None, :])                                 # 2 (u - v)
    bin_mass = (log_pmf.exp()[None, :] * (normal.cdf(tau * (offset + 1)) - normal.cdf(tau * (offset - 1)))).sum(1)
    gap = bound + bin_mass.log()[u]
    assert gap.mean() > -4 * gap.std() / math.sqrt(len(gap)) - prior_error
    assert gap.mean() < -log_z


def test_truncated_normal_dequantization_arguments():
    sde = VPSDE()
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    model = GaussianEps(continuous_schedule(sde), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="unknown dequantization 'gaussian'; accepted: 'uniform', 'truncated_normal'"):
        likelihood.bits_per_dim(model, sde, images, dequantization="gaussian")
    for tau in (0.0, -1.0):
        with pytest.raises(ValueError, match="truncation"):
            likelihood.bits_per_dim(model, sde, images, dequantization="truncated_normal", truncation=tau)
    with pytest.raises(ValueError, match=r"outside \(0, T\)"):  # t0 past T: tau = 1e-6 bin widths
        likelihood.truncation_time(sde, 1e-6)
    with pytest.raises(ValueError, match="eps is not an option"):
        likelihood.bits_per_dim(model, sde, images, dequantization="truncated_normal", eps=1e-3)
    y, t0, log_q = likelihood.truncated_normal_dequantization(
        sde, images, 1.0, generator=torch.Generator().manual_seed(0))
    alpha, sigma = sde.alpha(torch.tensor(t0, dtype=DTYPE)), sde.sigma(torch.tensor(t0, dtype=DTYPE))
    assert sigma / alpha == pytest.approx(1 / 255, rel=1e-9)        # tau = 1: sigma/alpha = h
    assert ((y - alpha * -1.0).abs() <= sigma + 1e-12).all() and log_q.shape == (2,)


# ---- ELBOs ------------------------------------------------------------------------------
@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_continuous_elbo_bounds_and_nearly_equals_the_gaussian_nll(sde_name):
    """E_x of the bound in closed form, per dimension (diagonal data N(mu, s^2)):

    prior KL  = 1/2 [(sigma_T^2 + alpha_T^2 (s^2 + mu^2)) / pi^2 - 1 - log(sigma_T^2 / pi^2)]
    recon     = 1/2 log(2 pi) + 1/2 - lambda_eps
    diffusion = int E||z - eps*||^2 dlambda = int s^2 e^{2 lambda} / (1 + s^2 e^{2 lambda}) dlambda
              = 1/2 log((1 + s^2 e^{2 lambda_eps}) / (1 + s^2 e^{2 lambda_T})),
    which exceeds the entropy 1/2 log(2 pi e s^2) only by second-order prior and
    reconstruction gaps.
    """
    sde, eps = SDES[sde_name](), 1e-5
    mean = torch.tensor([0.3, -0.2], dtype=DTYPE)
    std = torch.tensor([0.5, 0.2], dtype=DTYPE)
    model = GaussianEps(continuous_schedule(sde), mean, torch.diag(std ** 2))
    x = sample_gaussian(mean, torch.diag(std ** 2), 20000)
    bound, info = likelihood.continuous_negative_elbo(
        model, sde, x, eps=eps, num_times=4, generator=torch.Generator().manual_seed(0))
    assert info["nfe"] == likelihood.PROPOSAL_BINS + 4  # the pilot, then the estimate

    ends = torch.tensor([eps, sde.T], dtype=DTYPE)
    (alpha_T, sigma_T), prior_var = (sde.alpha(ends[1]), sde.sigma(ends[1])), sde.prior_std ** 2
    log_snr_eps, log_snr_T = sde.log_snr(ends)
    prior = 0.5 * ((sigma_T ** 2 + alpha_T ** 2 * (std ** 2 + mean ** 2)) / prior_var - 1
                   - torch.log(sigma_T ** 2 / prior_var))
    recon = 0.5 * math.log(2 * math.pi) + 0.5 - log_snr_eps
    diffusion = 0.5 * torch.log((1 + std ** 2 * torch.exp(2 * log_snr_eps))
                                / (1 + std ** 2 * torch.exp(2 * log_snr_T)))
    expected_bound = (prior + recon + diffusion).sum()
    entropy = (0.5 * torch.log(2 * math.pi * math.e * std ** 2)).sum()
    assert 0 <= expected_bound - entropy < 2e-3

    standard_error = bound.std() / math.sqrt(len(bound))
    assert abs(bound.mean() - expected_bound) < 4 * standard_error
    gap = bound - (-model.data_log_density(x))
    gap_standard_error = gap.std() / math.sqrt(len(gap))
    assert gap.mean() > -4 * gap_standard_error
    assert gap.mean() < 4 * gap_standard_error + 2e-3


def test_gaussian_kl_to_prior_per_dim_is_torch_kl_divergence():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, generator=generator, dtype=DTYPE) * 2
    for std, prior_std in ((0.3, 1.0), (1.7, 1.0), (0.9, 2.5)):
        std = torch.tensor(std, dtype=DTYPE)
        expected = torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, std.expand_as(mean)),
            torch.distributions.Normal(torch.zeros_like(mean), torch.full_like(mean, prior_std)))
        torch.testing.assert_close(likelihood.gaussian_kl_to_prior_per_dim(mean, std, prior_std),
                                   expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_continuous_elbo_prior_term_is_the_closed_form_kl(sde_name):
    """With the default SDEs alpha_T x is ~0.007 x (VP) or sigma_T = 50 dwarfs x (VE), so the
    prior term is ~1e-5 nats and invisible in the total; here the SDEs end far from their
    prior. KL(N(alpha_T x, sigma_T^2 I) || N(0, pi^2 I)) = sum_d 1/2 [sigma_T^2 / pi^2 - 1
    - log(sigma_T^2 / pi^2) + (alpha_T x_d)^2 / pi^2], with (Song et al. 2021, eqs. 29-33):

    VP, beta(t) = b0 + t (b1 - b0): log alpha_T = -(b0 + b1) / 4 at T = 1, sigma_T^2 =
        1 - alpha_T^2, pi = 1; with b0 = 0.1, b1 = 1: alpha_T = 0.760, sigma_T^2 = 0.423,
        1/2 (0.423 - 1 + 0.860) + 0.289 x_d^2 = 0.142 + 0.289 x_d^2 per dimension.
    VE: alpha_T = 1, sigma_T = sigma_max = pi: only x_d^2 / (2 sigma_max^2) remains
        (sigma_max = 1.5: 0.222 x_d^2).
    The reconstruction term is D (log(2 pi) / 2 + 1/2 - lambda(eps)) (module docstring) with
    lambda = log alpha - 1/2 log(1 - alpha^2) on VP and -log sigma on VE; the model (eps = 0)
    only affects the diffusion term, and the three parts add up to the bound.
    """
    b0, b1, sigma_min, sigma_max, eps = 0.1, 1.0, 0.01, 1.5, 1e-3
    sde = VPSDE(beta_min=b0, beta_max=b1) if sde_name == "vp" else VESDE(sigma_min, sigma_max)
    x = torch.tensor([[1.0, -0.5, 0.25], [-1.5, 2.0, 0.0], [0.3, 0.3, -0.9]], dtype=DTYPE)
    bound, info = likelihood.continuous_negative_elbo(
        lambda x_t, t: torch.zeros_like(x_t), sde, x, eps=eps,
        generator=torch.Generator().manual_seed(0))

    if sde_name == "vp":
        alpha_T, prior_var = math.exp(-(b0 + b1) / 4), 1.0
        sigma_T_sq = 1 - alpha_T ** 2
        alpha_eps = math.exp(-b0 * eps / 2 - (b1 - b0) * eps ** 2 / 4)
        log_snr_eps = math.log(alpha_eps) - 0.5 * math.log(1 - alpha_eps ** 2)
    else:
        alpha_T, prior_var, sigma_T_sq = 1.0, sigma_max ** 2, sigma_max ** 2
        log_snr_eps = -math.log(sigma_min * (sigma_max / sigma_min) ** eps)
    ratio = sigma_T_sq / prior_var
    prior = (0.5 * (ratio - 1 - math.log(ratio) + (alpha_T * x) ** 2 / prior_var)).sum(1)
    assert prior.min() > 0.1  # far above the ~0.1-nat noise band of the Monte Carlo tests
    torch.testing.assert_close(info["prior"], prior, rtol=1e-10, atol=0)
    reconstruction = 3 * (0.5 * math.log(2 * math.pi) + 0.5 - log_snr_eps)
    torch.testing.assert_close(info["reconstruction"], torch.full((3,), reconstruction, dtype=DTYPE),
                               rtol=1e-10, atol=0)
    torch.testing.assert_close(bound, info["prior"] + info["reconstruction"] + info["diffusion"],
                               rtol=1e-12, atol=1e-12)


def test_elbo_bands_of_the_diagnostic_bench_match_the_gaussian_closed_form():
    """bench/elbo_by_noise_level.py splits the diffusion term by band of lambda and by pixel
    class; with the exact eps of diagonal Gaussian data each (band, dimension) part has the
    mean 1/2 log((1 + s^2 e^{2 hi}) / (1 + s^2 e^{2 lo})) (derivation above), and the bands
    add up to the whole integral."""
    from bench.investigations.elbo_by_noise_level import band_integrals

    sde = VPSDE()
    mean, std = torch.tensor([0.3, -0.2], dtype=DTYPE), torch.tensor([0.5, 0.02], dtype=DTYPE)
    model = GaussianEps(continuous_schedule(sde), mean, torch.diag(std ** 2))
    x = sample_gaussian(mean, torch.diag(std ** 2), 20000)
    masks = torch.eye(2, dtype=torch.bool).expand(len(x), 2, 2)  # class c = dimension c
    ends = sde.log_snr(torch.tensor([sde.T, 1e-5], dtype=DTYPE))
    edges = torch.tensor([ends[0].item(), -1.0, 2.0, 5.0, ends[1].item()], dtype=DTYPE)
    parts = band_integrals(model, sde, x, masks, edges, draws=2, generator=torch.Generator().manual_seed(0))
    assert parts.shape == (4, len(x), 2)
    cumulative = 0.5 * torch.log1p(std[None] ** 2 * torch.exp(2 * edges[:, None]))  # [edges, dims]
    expected = cumulative.diff(dim=0)
    standard_error = parts.std(1) / math.sqrt(len(x))
    assert (abs(parts.mean(1) - expected) < 4 * standard_error + 1e-4).all(), (parts.mean(1), expected)
    # the narrow dimension (s = 0.02) costs almost nothing until lambda passes -log s = 3.9
    assert expected[0, 1] < 1e-3 < 1.0 < expected[3, 1]


def test_fitted_proposal_lowers_the_variance_and_keeps_the_mean():
    """Narrow data (s = 0.05): the integrand s^2 e^{2 lambda} / (1 + s^2 e^{2 lambda}) per
    dimension is a step in lambda, which uniform lambda samples badly."""
    sde, dims = VPSDE(), 8
    mean = torch.zeros(dims, dtype=DTYPE)
    model = GaussianEps(continuous_schedule(sde), mean, 0.05 ** 2 * torch.eye(dims, dtype=DTYPE))
    x = sample_gaussian(mean, 0.05 ** 2 * torch.eye(dims, dtype=DTYPE), 4000)
    ends = torch.tensor([1e-5, sde.T], dtype=DTYPE)
    uniform = likelihood.LogSnrProposal.continuous(*sde.log_snr(ends).flip(0))
    estimates = {}
    for name, proposal in (("uniform", uniform), ("fitted", None)):
        _, info = likelihood.continuous_negative_elbo(model, sde, x, proposal=proposal,
                                                      generator=torch.Generator().manual_seed(0))
        estimates[name] = info["diffusion"]
    spread = {name: value.std() for name, value in estimates.items()}
    assert spread["fitted"] < 0.5 * spread["uniform"]
    difference = estimates["fitted"].mean() - estimates["uniform"].mean()
    assert abs(difference) < 4 * math.hypot(*spread.values()) / math.sqrt(len(x))


def discretized_gaussian_pixels(mean, std, count, seed=0):
    """Pixels u with x = 2u/255 - 1 ~ N(mean, std^2) rounded to the grid, and their exact
    log-pmf (the Gaussian discretized into the decoder's bins)."""
    generator = torch.Generator().manual_seed(seed)
    x = mean + std * torch.randn(count, mean.numel(), generator=generator, dtype=DTYPE)
    images = torch.round((x + 1) * 255 / 2).clamp(0, 255).to(torch.uint8)
    log_pmf = likelihood.discretized_gaussian_log_likelihood(images, mean, std)
    return images, log_pmf


def test_ddpm_sum_estimate_is_unbiased():
    """Exact-eps model (on the DDPM tables) for N(mu, s^2): expanding
    z - eps*(alpha x_0 + sigma z) gives E[L_{i-1} | x_0] = w_i sum_d (alpha^4 s^4 +
    sigma^2 alpha^2 (x_0 - mu)^2) / v^2, v = alpha^2 s^2 + sigma^2; the exact sum over all N
    steps checks the importance-sampled estimate."""
    sde = VPSDE()
    mean = torch.tensor([0.1, -0.3], dtype=DTYPE)
    std = torch.tensor([0.3, 0.15], dtype=DTYPE)
    model = GaussianEps(ddpm_schedule(sde), mean, torch.diag(std ** 2))
    images, _ = discretized_gaussian_pixels(mean, std, 4000)
    _, info = likelihood.ddpm_negative_elbo(model, sde, images, num_times=4,
                                            generator=torch.Generator().manual_seed(0))
    pilot = int((info["proposal"].base > 0).sum())  # one call per occupied log-SNR bin
    assert info["nfe"] == pilot + 4 + 1  # the pilot, four times for the sum, the decoder

    x0 = images.double() * 2 / 255 - 1
    alpha, sigma = (v[1:, None, None] for v in sde.discrete_alpha_sigma())  # steps 2..N
    betas, alpha_bar = sde.betas, sde.alphas_cumprod
    weights = betas[1:] / (2 * (1 - betas[1:]) * (1 - alpha_bar[:-1]))
    variance = alpha ** 2 * std ** 2 + sigma ** 2
    per_step = ((alpha ** 4 * std ** 4 + sigma ** 2 * alpha ** 2 * (x0 - mean) ** 2)
                / variance ** 2).sum(-1)                                     # [N-1, B]
    error = info["diffusion"] - (weights[:, None] * per_step).sum(0)
    assert abs(error.mean()) < 4 * error.std() / math.sqrt(len(error))


def test_ddpm_elbo_bounds_the_exact_pixel_nll():
    """1-D pixels from a discretized Gaussian and the exact eps of that discrete law (a
    256-component mixture with zero-width components), so the bound is on the true -log P.

    The slack is the DDPM chain's, not the estimator's: at step 1 the noise sqrt(beta_1) =
    0.01 spans 1.3 pixel bins (2/255), and the Gaussian reverse kernels and decoder (std
    sqrt(beta_tilde_2) = 0.0074) cannot represent the multimodal posterior over bins (Ho et
    al. report L_0 = 1.97 bits/dim on CIFAR-10). It stays below one nat per pixel.
    """
    sde = VPSDE()
    mean, std = torch.tensor([0.1], dtype=DTYPE), torch.tensor([0.3], dtype=DTYPE)
    levels = torch.arange(256, dtype=torch.uint8)[:, None]
    pmf = likelihood.discretized_gaussian_log_likelihood(levels, mean, std).exp()
    model = MixtureEps(ddpm_schedule(sde), pmf, levels.double() * 2 / 255 - 1, torch.zeros(256))
    images, log_pmf = discretized_gaussian_pixels(mean, std, 2000)
    bound, _ = likelihood.ddpm_negative_elbo(model, sde, images, num_times=4,
                                             generator=torch.Generator().manual_seed(0))
    gap = bound + log_pmf
    gap_standard_error = gap.std() / math.sqrt(len(gap))
    assert gap.mean() > -4 * gap_standard_error
    assert gap.mean() < 1.0


class ZeroDenoiser(torch.nn.Module):
    """eps_theta(x_i, t_i) = x_i / sigma_i on the DDPM tables: x0_theta = (x - sigma eps) /
    alpha = 0 at every step, whatever the noise drawn. A float64 module, so that the bound
    calls it in float64 (a plain function would get the float32 default for uint8 input)."""

    def __init__(self, sde):
        super().__init__()
        self.schedule = ddpm_schedule(sde)
        self.unused = torch.nn.Parameter(torch.zeros((), dtype=DTYPE))

    def forward(self, x, t):
        _, sigma = self.schedule(t.to(DTYPE))
        return x / sigma.reshape((-1,) + (1,) * (x.ndim - 1))


def test_ddpm_reconstruction_is_the_discretized_gaussian_with_beta_tilde_2():
    """L_0 = -log p(u | x_1) under Ho et al.'s discretized Gaussian decoder (eq. 13) with mean
    x0_theta(x_1) and variance beta_tilde_2 = beta_2 (1 - alphabar_1) / (1 - alphabar_2)
    (beta_tilde_1 = 0; Ho et al.'s code takes step 2's value). With x0_theta = 0 it does not
    depend on the noise: one pixel per image, x = 2u/255 - 1, bin [x - 1/255, x + 1/255]
    (open-ended at u = 0 and 255), L_0 = -log(Phi(upper / s) - Phi(lower / s)).

    Ho's betas linspace(1e-4, 0.02, 1000): beta_1 = 1e-4, beta_2 = 1.1992e-4, so beta_tilde_2
    = beta_2 beta_1 / (beta_1 + beta_2 - beta_1 beta_2) = 5.45e-5, s = 0.00738, where beta_2
    alone would give s = 0.01095: at u = 128, -log(Phi(0.00784 / s) - 1/2) = 1.03 against
    1.34 nats.
    """
    import numpy as np
    from scipy.stats import norm

    sde = VPSDE()
    pixels = np.array([0, 118, 121, 124, 126, 127, 128, 129, 131, 134, 137, 255])
    images = torch.from_numpy(pixels.astype(np.uint8))[:, None]       # [12 images, 1 pixel]
    bound, info = likelihood.ddpm_negative_elbo(ZeroDenoiser(sde).eval(), sde, images,
                                                generator=torch.Generator().manual_seed(0))

    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar_1, alpha_bar_2 = 1 - betas[0], (1 - betas[0]) * (1 - betas[1])
    std = math.sqrt(betas[1] * (1 - alpha_bar_1) / (1 - alpha_bar_2))
    assert std == pytest.approx(0.00738, abs=1e-5)
    x = 2 * pixels / 255 - 1
    lower, upper = (x - 1 / 255) / std, (x + 1 / 255) / std
    log_pmf = np.where(pixels == 0, norm.logcdf(upper),                  # bin (-inf, -1 + 1/255]
                       np.where(pixels == 255, norm.logsf(lower),          # bin [1 - 1/255, +inf)
                                np.log(np.where(lower > 0, norm.sf(lower) - norm.sf(upper),
                                                norm.cdf(upper) - norm.cdf(lower)).clip(1e-300))))
    # rtol: the bound takes x from sde.data.uint8_to_float, in float32 (x off by up to 6e-8,
    # 1e-5 of s), which moves L_0 by up to 6e-6 relative here; beta_2 would move it by 30%
    torch.testing.assert_close(info["reconstruction"], torch.from_numpy(-log_pmf), rtol=1e-4, atol=0)
    assert info["reconstruction"][pixels == 128].item() == pytest.approx(1.03, abs=0.01)
    torch.testing.assert_close(bound, info["prior"] + info["diffusion"] + info["reconstruction"],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("continuous", [True, False])
def test_elbo_bits_per_dim_parts_add_up(continuous):
    sde = VPSDE()
    dims = 4
    schedule = continuous_schedule(sde) if continuous else ddpm_schedule(sde)
    model = GaussianEps(schedule, torch.zeros(dims), 0.04 * torch.eye(dims))
    images = torch.randint(100, 156, (32, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    mean, standard_error, info = likelihood.elbo_bits_per_dim(
        model, sde, images, continuous=continuous, repeats=3, batch_size=10,
        generator=torch.Generator().manual_seed(1))
    assert 0 < mean < 8 and standard_error > 0
    assert info["per_image"].shape == (32, 3)
    pilot = int((info["proposal"].base > 0).sum())  # once, on the first batch
    assert info["nfe"] == pilot + 3 * 4 * (1 if continuous else 2)  # repeats x batches x calls
    parts = info["prior"] + info["diffusion"] + info["reconstruction"]
    assert abs(parts - mean) < 1e-9


def test_heldout_metrics_use_the_configured_dequantization():
    """--mode eval's bits/dim follows eval.bpd_dequantization and says which one it used."""
    from conftest import make_tiny_config
    from sde import data
    from sde.models import create_model
    from sde.modes.evaluate import heldout_metrics
    from sde.sdes import create_sde

    config = make_tiny_config()
    config.eval.batch_size = 2
    torch.manual_seed(0)
    model = create_model(config).eval()
    sde = create_sde(config)
    heldout = data.load_dataset(config)[0][:2]
    reports = {}
    for dequantization in likelihood.DEQUANTIZATIONS:
        config.eval.bpd_dequantization = dequantization
        reports[dequantization] = heldout_metrics(config, model, sde, heldout)["bpd_ode"]
    assert reports["uniform"]["dequantization"] == "uniform" and "t0" not in reports["uniform"]
    truncated = reports["truncated_normal"]
    assert truncated["truncation"] == config.eval.bpd_truncation
    assert truncated["t0"] == likelihood.truncation_time(sde, config.eval.bpd_truncation)
    assert 0 < truncated["mean"] != reports["uniform"]["mean"] > 0


def test_heldout_metrics_report_each_image_in_order():
    """The per-image bits/dim of --mode eval's report: one value per held-out image, whose mean
    is the reported mean, each in its image's place (so that two reports of the same subset
    pair image by image): the last batch's image is the value the likelihood gives it alone,
    with that batch's noise."""
    from conftest import make_tiny_config
    from sde import data
    from sde.models import create_model
    from sde.modes.evaluate import BPD_ODE_STREAM, _batch_generator, heldout_metrics
    from sde.sdes import create_sde

    config = make_tiny_config()
    config.eval.batch_size = 1
    torch.manual_seed(0)
    model = create_model(config).eval()
    with torch.no_grad():  # the output layer starts at zero: make the network depend on its input
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    sde = create_sde(config)
    digit = data.load_dataset(config)[0][:1]
    heldout = torch.cat([torch.full_like(digit, 255), digit])  # far apart in bits/dim
    report = heldout_metrics(config, model, sde, heldout)
    for key in ("bpd_ode", "bpd_elbo"):
        values = report[key]["per_image"]
        assert len(values) == 2 and abs(sum(values) / 2 - report[key]["mean"]) < 1e-5
    _, _, alone = likelihood.bits_per_dim(model, sde, heldout[1:], batch_size=1,
                                          generator=_batch_generator(config.seed, BPD_ODE_STREAM, 1))
    ode = report["bpd_ode"]["per_image"]
    assert ode[1] == pytest.approx(alone["per_image"].item(), abs=1e-5)
    assert abs(ode[1] - ode[0]) > 1e-2  # a value in the wrong place would fail