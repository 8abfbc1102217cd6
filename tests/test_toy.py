"""Toy densities forward and back: the 1-D sets, the exact-score model, the flow figures, toy
eval metrics (sliced Wasserstein, ODE log-likelihood against the true density)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import toy_vp
from evaluation.points import sliced_wasserstein
from sde import data, likelihood, samplers
from sde.models import create_model
from sde.sdes import SubVPSDE, create_sde
from sde.testing.oracles import GaussianMixtureOracle
from sde.toy_figures import SNAPSHOT_RATIOS, reverse_states, snapshot_times

ROOT = Path(__file__).resolve().parents[1]
SDE_NAMES = ("vp", "subvp", "ve")


def exact_config(name: str, sde_name: str = "vp"):
    config = toy_vp.get_config()
    config.model.name, config.data.toy_name, config.sde.name = "exact", name, sde_name
    return config


def exact_model(name: str, sde_name: str = "vp"):
    config = exact_config(name, sde_name)
    return create_model(config).eval(), create_sde(config)


# ---- the 1-D sets ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gaussian_1d", "two_gaussians_1d"])
def test_one_dimensional_sets_match_their_closed_form(name):
    mixture = data.toy_mixture(name)
    points = data.load_toy(name, 200_000, seed=3, split="train").double()
    assert points.shape == (200_000, 1) and data.toy_dim(name) == 1
    weights, means = mixture.weights, mixture.means[:, 0]
    mean = float((weights * means).sum())
    variance = float((weights * (mixture.covariances[:, 0, 0] + means ** 2)).sum()) - mean ** 2
    assert points.mean().item() == pytest.approx(mean, abs=0.01)
    assert points.var().item() == pytest.approx(variance, rel=0.01)
    # the density integrates to one and its histogram is the samples'
    grid = torch.linspace(-6, 6, 20001, dtype=torch.float64)[:, None]
    density = mixture.log_prob(grid).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)
    counts, edges = np.histogram(points[:, 0].numpy(), bins=60, range=(-3, 3))
    centres = torch.as_tensor(0.5 * (edges[1:] + edges[:-1]))[:, None]
    expected = mixture.log_prob(centres).exp().numpy() * len(points) * (edges[1] - edges[0])
    assert np.abs(counts - expected).max() < 0.02 * expected.max()


@pytest.mark.parametrize("name", data.CLOSED_FORM_NAMES)
def test_mixture_score_is_the_gradient_of_its_log_density(name):
    mixture = data.toy_mixture(name).noised(0.7, 0.4)
    x = data.load_toy(name, 64, seed=0, split="test").double().requires_grad_(True)
    (gradient,) = torch.autograd.grad(mixture.log_prob(x).sum(), x)
    torch.testing.assert_close(mixture.score(x.detach()), gradient, rtol=1e-10, atol=1e-10)


def test_noised_mixture_is_the_law_of_the_noised_data():
    mixture = data.toy_mixture("two_gaussians")
    generator = torch.Generator().manual_seed(0)
    x0 = mixture.sample(400_000, generator).double()
    noised = 0.6 * x0 + 0.5 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    law = mixture.noised(0.6, 0.5)
    mean = (law.weights[:, None] * law.means).sum(0)
    second = (law.weights[:, None, None] * (law.covariances + law.means[:, :, None] * law.means[:, None, :])).sum(0)
    torch.testing.assert_close(noised.mean(0), mean, atol=5e-3, rtol=0)
    torch.testing.assert_close(torch.cov(noised.T), second - torch.outer(mean, mean), atol=5e-3, rtol=0)


# ---- the exact model -------------------------------------------------------------------------

@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("name", data.CLOSED_FORM_NAMES)
def test_exact_model_is_minus_sigma_times_the_marginal_score(name, sde_name):
    model, sde = exact_model(name, sde_name)
    mixture = data.toy_mixture(name)
    x = 1.5 * torch.randn(32, data.toy_dim(name), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for t in (1e-3, 0.1, 0.5, 1.0):
        t_tensor = torch.full((32,), t, dtype=torch.float64)
        alpha, sigma = float(sde.alpha(t_tensor[:1])), float(sde.sigma(t_tensor[:1]))
        expected = -sigma * mixture.noised(alpha, sigma).score(x)
        torch.testing.assert_close(model(x, t_tensor), expected, rtol=1e-9, atol=1e-12)


def test_exact_model_agrees_with_the_diagonal_oracle_of_the_tests():
    model, sde = exact_model("two_gaussians_1d")
    mixture = data.toy_mixture("two_gaussians_1d")
    oracle = GaussianMixtureOracle(sde, mixture.weights, mixture.means, mixture.covariances[:, :, 0].sqrt())
    x = torch.linspace(-4, 4, 50, dtype=torch.float64)[:, None]
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    torch.testing.assert_close(model(x, t), oracle(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_name", SDE_NAMES)
@pytest.mark.parametrize("name", ["two_gaussians_1d", "two_gaussians"])
def test_ode_density_of_the_exact_score_is_the_data_density_up_to_the_prior_mismatch(name, sde_name):
    """With the exact score the probability-flow ODE carries p_eps onto p_T exactly, so its
    log-likelihood is log p_eps(x) + log pi(x_T) - log p_T(x_T): the data's density at eps
    plus the prior mismatch at T (Song et al. 2021, eq. 39-40), to the solver's tolerance."""
    model, sde = exact_model(name, sde_name)
    mixture = data.toy_mixture(name)
    x = data.load_toy(name, 40, seed=0, split="test").double()
    eps = likelihood.DEFAULT_EPS
    logp, info = likelihood.ode_log_likelihood(model, sde, x, divergence="exact", rtol=1e-8, atol=1e-8, eps=eps)

    def marginal(t: float):
        t_tensor = torch.tensor([t], dtype=torch.float64)
        return mixture.noised(float(sde.alpha(t_tensor)), float(sde.sigma(t_tensor)))

    expected = marginal(eps).log_prob(x) + info["prior_logp"] - marginal(sde.T).log_prob(info["x_T"])
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-6)
    # and the mismatch itself is small: the ODE's density is close to the data's
    assert (logp - mixture.log_prob(x)).abs().max() < 0.03


def test_sub_vp_time_from_log_snr_is_finite_for_every_log_snr():
    """An adaptive solver's first-step probe may ask for any log-SNR; the inverse must not
    overflow (it once returned NaN below lambda = -354 and made the exact-score ODE fail)."""
    sde = SubVPSDE()
    log_snr = torch.tensor([-1e4, -800.0, -50.0, -1e-3, 0.0, 1e-3, 13.8, 50.0, 1e4], dtype=torch.float64)
    t = sde.t_from_log_snr(log_snr)
    assert torch.isfinite(t).all() and (torch.diff(t) <= 0).all()
    times = torch.linspace(1e-5, 1.0, 33, dtype=torch.float64)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(times)), times, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["two_gaussians_1d", "two_gaussians"])
def test_every_sampler_draws_the_toy_law_with_the_exact_score(name):
    """Sliced Wasserstein from the law within a few times the floor of two exact draws."""
    model, sde = exact_model(name)
    count = 3000
    law = data.load_toy(name, count, seed=0, split="test")
    floor = sliced_wasserstein(data.load_toy(name, count, seed=0, split="train"), law,
                               generator=torch.Generator().manual_seed(0))
    for method in samplers.available():
        x, _ = samplers.sample(method, model, sde, (count, data.toy_dim(name)), steps=100,
                               generator=torch.Generator().manual_seed(5))
        distance = sliced_wasserstein(x.float(), law, generator=torch.Generator().manual_seed(0))
        assert distance < 3 * floor, f"{method}: sliced W2 {distance:.4f}, floor {floor:.4f}"


# ---- sliced Wasserstein ----------------------------------------------------------------------

def test_sliced_wasserstein_in_one_dimension_is_the_sorted_distance():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 1, generator=generator), torch.randn(500, 1, generator=generator) + 0.3
    expected = (torch.sort(a[:, 0].double()).values - torch.sort(b[:, 0].double()).values).pow(2).mean().sqrt()
    assert sliced_wasserstein(a, b) == pytest.approx(float(expected), rel=1e-12)
    assert sliced_wasserstein(a, a) == 0.0


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_sliced_wasserstein_of_a_shift_is_its_length_over_root_dim(dim):
    """For a set and its shift by m, W2 along theta is |theta . m| whatever the set, and
    E (theta . m)^2 = |m|^2 / D over directions uniform on the sphere."""
    generator = torch.Generator().manual_seed(dim)
    a = torch.randn(200, dim, generator=generator, dtype=torch.float64)
    shift = torch.full((dim,), 2.0, dtype=torch.float64)
    distance = sliced_wasserstein(a, a + shift, projections=4096, generator=generator)
    assert distance == pytest.approx(float(shift.norm()) / math.sqrt(dim), rel=0.03)


def test_sliced_wasserstein_refuses_sets_of_different_shapes():
    with pytest.raises(ValueError, match="two \\[N, D\\] sets of one shape"):
        sliced_wasserstein(torch.zeros(10, 2), torch.zeros(9, 2))


# ---- figures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("sde_name", SDE_NAMES)
def test_snapshot_times_have_the_documented_signal_to_noise_ratios(sde_name):
    sde = create_sde(exact_config("gaussian", sde_name))
    times = snapshot_times(sde)
    assert times[0] == 0.0 and times[-1] == sde.T and all(a < b for a, b in zip(times, times[1:]))
    inner = torch.tensor(times[1:-1], dtype=torch.float64)
    torch.testing.assert_close(sde.alpha(inner) / sde.sigma(inner),
                               torch.tensor(SNAPSHOT_RATIOS, dtype=torch.float64), rtol=1e-8, atol=0)


def test_reverse_states_run_from_x_T_at_T_to_the_samples_at_zero():
    model, sde = exact_model("gaussian_1d")
    x_T = torch.randn(50, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    times, states = reverse_states(model, sde, "ddim", 10, {}, x_T, torch.Generator().manual_seed(0))
    assert times[0] == sde.T and times[-1] == 0.0 and (np.diff(times) < 0).all()
    assert states.shape == (len(times), 50, 1) and np.array_equal(states[0], x_T.numpy())
    x, _ = samplers.sample("ddim", model, sde, (50, 1), steps=10, x_T=x_T)
    np.testing.assert_array_equal(states[-1], x.numpy())


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "--config", str(ROOT / "configs/toy_vp.py"),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sample_and_eval_of_the_exact_model_from_the_cli(tmp_path):
    common = ["--workdir", str(tmp_path), "--config.model.name=exact", "--config.data.toy_name=two_gaussians_1d",
              "--config.sampling.num_samples=500", "--config.sampling.batch_size=500"]
    result = run_main("--mode", "sample", *common)
    assert result.returncode == 0, result.stderr
    name = "dpm_solver_20steps_seed0"
    record = json.loads((tmp_path / "samples" / f"{name}.json").read_text())
    assert record["files"]["flow"] == f"{name}_flow.png" and record["checkpoint_step"] is None
    for suffix in (".png", "_flow.png"):
        assert (tmp_path / "samples" / f"{name}{suffix}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_main("--mode", "eval", *common, "--config.eval.num_samples=2000", "--config.eval.bpd_num_images=50")
    assert result.returncode == 0, result.stderr
    assert "sliced W2 to data" in result.stdout and "-log p (ODE)" in result.stdout
    report = json.loads((tmp_path / "eval" / "report_exact.json").read_text())
    assert report["nll_ode"]["mean_abs_error"] < 0.02
    assert report["nll_ode"]["mean"] == pytest.approx(report["nll_ode"]["true_mean"], abs=0.02)
    samples = report["samples"]
    assert samples["num_samples"] == 2000 and samples["sliced_wasserstein"] < 3 * samples["sliced_wasserstein_floor"]


@pytest.mark.parametrize("args, message", [
    (["--mode", "train", "--config.model.name=exact", "--config.data.toy_name=gaussian"],
     "error: model.name='exact' is the closed-form score of the toy set: it has nothing to train"),
    (["--mode", "sample", "--config.model.name=exact", "--config.data.toy_name=spiral"],
     "error: model.name='exact' needs a toy set with a closed-form density"),
    (["--mode", "sample", "--config.model.name=exact", "--config.data.toy_name=gaussian",
      "--config.sampling.checkpoint=weights.safetensors"],
     "error: model.name='exact' has no weights to load; leave sampling.checkpoint empty"),
    (["--mode", "export", "--config.model.name=exact", "--config.data.toy_name=gaussian"],
     "error: model.name='exact' is a closed form with no weights to export"),
])
def test_misuses_of_the_exact_model_get_one_line_and_exit_2(tmp_path, args, message):
    result = run_main("--workdir", str(tmp_path / "run"), *args)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_trained_mlp_on_one_dimensional_data_samples_and_draws_its_flow(tmp_path):
    common = ["--workdir", str(tmp_path), "--config.data.toy_name=two_gaussians_1d", "--config.training.n_iters=100",
              "--config.training.snapshot_freq=100", "--config.training.sample_freq=100", "--config.model.nf=64",
              "--config.model.num_layers=2"]
    assert run_main("--mode", "train", *common).returncode == 0
    result = run_main("--mode", "sample", *common, "--config.sampling.num_samples=200",
                      "--config.sampling.batch_size=200")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "samples" / "dpm_solver_20steps_seed0.npz") as saved:
        assert saved["points"].shape == (200, 1) and np.isfinite(saved["points"]).all()
    assert (tmp_path / "samples" / "dpm_solver_20steps_seed0_flow.png").is_file()


def test_the_python_api_gives_the_exact_toy_model_and_its_flow_figure(tmp_path):
    import sde as toolkit

    pipe = toolkit.exact_toy("two_gaussians_1d", sde="subvp")
    x, info = pipe.sample(4000, method="ddim", steps=50)
    mixture = data.toy_mixture("two_gaussians_1d")
    mean = float((mixture.weights * mixture.means[:, 0]).sum())
    assert x.shape == (4000, 1) and info["nfe"] == 50 and x.double().mean().item() == pytest.approx(mean, abs=0.05)
    path = pipe.flow_figure(tmp_path / "flow.png", method="ddim", steps=30)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="closed-form density"):
        toolkit.exact_toy("spiral")
