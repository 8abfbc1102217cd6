"""Losses against closed forms for Gaussian data N(0, s^2 I), whose optimal eps is known.

For x_t = alpha x_0 + sigma z with x_0 ~ N(0, s^2), E[z | x_t] = sigma x_t / (alpha^2 s^2 +
sigma^2), and the mean squared error of that optimal predictor is
alpha^2 s^2 / (alpha^2 s^2 + sigma^2) per dimension.
"""
import math

import pytest
import torch

from sde import SubVPSDE, VESDE, VPSDE
from sde.losses import LossConfig, make_loss_fn, p2_weight, sample_time

DATA_STD = 0.5


def optimal_mse(alpha, sigma):
    return alpha ** 2 * DATA_STD ** 2 / (alpha ** 2 * DATA_STD ** 2 + sigma ** 2)


def continuous_oracle(sde):
    def model(x, t):
        alpha, sigma = sde.alpha(t.double()), sde.sigma(t.double())
        return (sigma / (alpha ** 2 * DATA_STD ** 2 + sigma ** 2))[:, None].to(x.dtype) * x
    return model


def expected_loss(sde, cfg, points=200001):
    """E_t[w(t) mse*(t)] by the trapezoid rule over t in [eps, T], w normalised to mean 1."""
    t = torch.linspace(cfg.eps, sde.T, points, dtype=torch.float64)
    weight = torch.ones_like(t)
    if cfg.likelihood_weighting:
        weight = sde.diffusion_sq(t) / sde.sigma(t) ** 2
    elif cfg.p2_gamma:  # Choi et al. 2022 eq. 8 written out: (k + alpha^2 / sigma^2)^-gamma
        weight = (cfg.p2_k + sde.alpha(t) ** 2 / sde.sigma(t) ** 2) ** -cfg.p2_gamma
    weight = weight / (torch.trapezoid(weight, t) / (sde.T - cfg.eps))
    return (torch.trapezoid(weight * optimal_mse(sde.alpha(t), sde.sigma(t)), t) / (sde.T - cfg.eps)).item()


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(0.01, 5.0)], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("weighting", ["plain", "likelihood_uniform", "likelihood_importance", "p2"])
def test_continuous_loss_of_optimal_model_matches_closed_form(sde, weighting):
    cfg = LossConfig(continuous=True, likelihood_weighting=weighting.startswith("likelihood"),
                     importance_sampling=weighting == "likelihood_importance", eps=1e-3,
                     p2_gamma=0.5 if weighting == "p2" else 0.0, p2_k=2.0)
    loss_fn = make_loss_fn(sde, cfg)
    generator = torch.Generator().manual_seed(0)
    model = continuous_oracle(sde)
    estimates = torch.stack([
        loss_fn(model, DATA_STD * torch.randn(4096, 4, generator=generator, dtype=torch.float64),
                generator=generator) for _ in range(8)])
    expected = expected_loss(sde, cfg)
    # 8 x 4096 draws of a bounded estimator (uniform weighting: heavy-ish tail near eps)
    tolerance = 5 * estimates.std().item() / math.sqrt(len(estimates)) + 1e-3
    assert abs(estimates.mean().item() - expected) < tolerance


def test_p2_weight_is_sigma_squared_on_vp_with_k_and_gamma_one_and_has_mean_one():
    """On VP alpha^2 + sigma^2 = 1, so 1 / (1 + SNR) = sigma^2; normalised to mean 1 over t."""
    sde = VPSDE()
    cfg = LossConfig(eps=1e-3, p2_gamma=1.0, p2_k=1.0)
    t = torch.linspace(cfg.eps, sde.T, 100001, dtype=torch.float64)
    weight = p2_weight(sde, t, cfg)
    sigma_sq = sde.sigma(t) ** 2
    assert torch.allclose(weight / weight[-1], sigma_sq / sigma_sq[-1], rtol=1e-9)
    assert (torch.trapezoid(weight, t) / (sde.T - cfg.eps)).item() == pytest.approx(1.0, abs=1e-6)
    drawn, drawn_weight = sample_time(sde, 1000, cfg, torch.Generator().manual_seed(0))
    assert drawn_weight.std() > 0.1 and torch.allclose(drawn_weight, p2_weight(sde, drawn, cfg))


def test_p2_is_refused_with_the_likelihood_weight_or_the_discrete_loss():
    for cfg in (LossConfig(p2_gamma=1.0, likelihood_weighting=True), LossConfig(p2_gamma=1.0, continuous=False)):
        with pytest.raises(ValueError, match="p2_gamma reweights the plain continuous loss"):
            make_loss_fn(VPSDE(), cfg)


def test_likelihood_weight_is_minus_twice_log_snr_rate():
    """g^2 / sigma^2 = -2 d log_snr/dt for all SDEs: why log-SNR sampling is exact IS."""
    for sde in (VPSDE(), VPSDE(schedule="cosine"), SubVPSDE(), VESDE()):
        t = torch.linspace(0.01, sde.T * 0.99, 50, dtype=torch.float64)
        h = 1e-6
        rate = (sde.log_snr(t + h) - sde.log_snr(t - h)) / (2 * h)
        assert torch.allclose(sde.diffusion_sq(t) / sde.sigma(t) ** 2, -2 * rate, rtol=1e-5)


def test_importance_sampling_spreads_time_uniformly_in_log_snr():
    sde = VPSDE()
    cfg = LossConfig(likelihood_weighting=True, importance_sampling=True, eps=1e-5)
    t, weight = sample_time(sde, 100000, cfg, torch.Generator().manual_seed(0))
    log_snr = sde.log_snr(t)
    low, high = sde.log_snr(torch.tensor([sde.T, cfg.eps], dtype=torch.float64))
    assert torch.all(weight == 1)
    assert log_snr.mean().item() == pytest.approx(((low + high) / 2).item(), abs=0.05)
    assert log_snr.var().item() == pytest.approx(((high - low) ** 2 / 12).item(), rel=0.02)


def test_discrete_loss_uses_ddpm_tables():
    """L_simple of the optimal model equals the mean over i of the closed-form mse at (alpha_i, sigma_i)."""
    sde = VPSDE(N=1000)
    alpha_i, sigma_i = sde.discrete_alpha_sigma()
    times = sde.discrete_times

    def model(x, t):
        index = torch.round(t.double() * sde.N / sde.T).long() - 1
        assert torch.allclose(times[index], t.double(), atol=1e-6), "model must see t_i = i/N"
        a, s = alpha_i[index], sigma_i[index]
        return (s / (a ** 2 * DATA_STD ** 2 + s ** 2))[:, None].to(x.dtype) * x

    loss_fn = make_loss_fn(sde, LossConfig(continuous=False))
    generator = torch.Generator().manual_seed(0)
    estimates = torch.stack([
        loss_fn(model, DATA_STD * torch.randn(4096, 4, generator=generator, dtype=torch.float64),
                generator=generator) for _ in range(8)])
    expected = optimal_mse(alpha_i, sigma_i).mean().item()
    assert abs(estimates.mean().item() - expected) < 5 * estimates.std().item() / math.sqrt(8) + 1e-3


def test_a_worse_model_has_a_larger_loss():
    sde = VPSDE()
    loss_fn = make_loss_fn(sde, LossConfig())
    x0 = DATA_STD * torch.randn(8192, 4, generator=torch.Generator().manual_seed(0))
    oracle = continuous_oracle(sde)
    good = loss_fn(oracle, x0, generator=torch.Generator().manual_seed(1))
    bad = loss_fn(lambda x, t: 1.2 * oracle(x, t), x0, generator=torch.Generator().manual_seed(1))
    assert bad > good


def test_discrete_with_likelihood_weighting_is_refused():
    with pytest.raises(ValueError, match="continuous=True"):
        make_loss_fn(VPSDE(), LossConfig(continuous=False, likelihood_weighting=True))


@pytest.mark.parametrize("continuous", [True, False])
def test_sharded_losses_average_to_the_global_batch_loss(continuous):
    """Two ranks with identically seeded generators see the single-process noise."""
    sde = VPSDE()
    loss_fn = make_loss_fn(sde, LossConfig(continuous=continuous))
    x0 = DATA_STD * torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = continuous_oracle(sde)
    whole = loss_fn(model, x0, generator=torch.Generator().manual_seed(3))
    halves = [loss_fn(model, x0[rank * 32:(rank + 1) * 32], generator=torch.Generator().manual_seed(3),
                      shard=(rank, 2)) for rank in range(2)]
    assert torch.allclose(whole, sum(halves) / 2)
