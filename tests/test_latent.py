"""The probability-flow ODE's latent space: encode / decode against the closed form of Gaussian
data, the solvers' orders, slerp's norms, agreement with the likelihood's latent, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sde as toolkit
from sde import data, latent, likelihood

ROOT = Path(__file__).resolve().parents[1]


def gaussian_encoder(pipe, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The exact encoder of N(mu, Sigma) data: the probability-flow ODE is linear, and with
    C_t = alpha_t^2 Sigma + sigma_t^2 I (all C_t commute) its flow from eps to T is
    x_T = alpha_T mu + C_T^{1/2} C_eps^{-1/2} (x - alpha_eps mu)."""
    mixture = data.toy_mixture(pipe.config.data.toy_name)
    mu, covariance = mixture.means[0], mixture.covariances[0]

    def at(t: float) -> tuple[float, torch.Tensor]:
        t_tensor = torch.tensor([t], dtype=torch.float64)
        alpha, sigma = float(pipe.sde.alpha(t_tensor)), float(pipe.sde.sigma(t_tensor))
        return alpha, alpha ** 2 * covariance + sigma ** 2 * torch.eye(len(mu), dtype=torch.float64)

    def power(matrix: torch.Tensor, exponent: float) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag(values ** exponent) @ vectors.T

    alpha_eps, c_eps = at(eps)
    alpha_T, c_T = at(pipe.sde.T)
    return alpha_T * mu + (x - alpha_eps * mu) @ (power(c_T, 0.5) @ power(c_eps, -0.5)).T


@pytest.fixture(scope="module", params=["vp", "subvp", "ve"])
def gaussian(request):
    pipe = toolkit.exact_toy("gaussian", sde=request.param)
    return pipe, data.load_toy("gaussian", 100, seed=0, split="test").double()


def test_adaptive_encoder_is_the_closed_form_and_decoding_inverts_it(gaussian):
    pipe, x = gaussian
    z, info = latent.encode(pipe.model, pipe.sde, x, method="adaptive", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z, gaussian_encoder(pipe, x, latent.DEFAULT_EPS), rtol=0, atol=1e-6)
    back, _ = latent.decode(pipe.model, pipe.sde, z, method="adaptive", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)
    assert info["nfe"] > 0 and info["steps"] is None


@pytest.mark.parametrize("method, order", [("ddim", 1), ("dpm_solver_2", 2)])
def test_fixed_step_inversion_error_falls_at_the_methods_order(gaussian, method, order):
    pipe, x = gaussian
    exact = gaussian_encoder(pipe, x, latent.DEFAULT_EPS)
    errors = []
    for steps in (20, 40, 80):
        z, info = latent.encode(pipe.model, pipe.sde, x, method=method, steps=steps)
        assert info["nfe"] == latent.STAGES[method] * steps
        errors.append(float((z - exact).abs().max()))
    for coarse, fine in zip(errors, errors[1:]):
        assert math.log2(coarse / fine) == pytest.approx(order, abs=0.3), errors
    back, info = latent.reconstruct(pipe.model, pipe.sde, x, method=method, steps=80)
    assert info["rmse_mean"] < errors[-1]  # the way back undoes most of the way out's error


def test_ddim_decoding_is_the_ddim_sampler_on_the_same_grid():
    """Decoding by the first-order method on a grid is the DDIM sampler (eta = 0) on that grid,
    so encoding with it is DDIM inversion (the same update, run towards noise)."""
    from sde import samplers

    pipe = toolkit.exact_toy("two_gaussians_1d")
    z = torch.randn(50, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = latent.log_snr_grid(pipe.sde, latent.DEFAULT_EPS, 12)
    decoded, _ = latent.decode(pipe.model, pipe.sde, z, method="ddim", steps=12)
    sampled, _ = samplers.sample("ddim", pipe.model, pipe.sde, z.shape, steps=13, x_T=z, denoise=False,
                                 schedule=tuple(grid.flip(0).tolist()))
    torch.testing.assert_close(decoded, sampled, rtol=1e-10, atol=1e-10)


def test_encoder_latent_agrees_with_the_likelihoods():
    pipe = toolkit.exact_toy("two_gaussians")
    x = data.load_toy("two_gaussians", 30, seed=1, split="test").double()
    z, _ = latent.encode(pipe.model, pipe.sde, x, method="adaptive", rtol=1e-9, atol=1e-9)
    _, info = likelihood.ode_log_likelihood(pipe.model, pipe.sde, x, eps=latent.DEFAULT_EPS, variable="t",
                                            divergence="exact", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z, info["x_T"], rtol=0, atol=1e-6)


def test_slerp_of_a_zero_latent_falls_back_to_lerp():
    zero, z1 = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    path = latent.slerp(zero, z1, torch.linspace(0, 1, 5, dtype=torch.float64))
    assert torch.isfinite(path).all()
    torch.testing.assert_close(path, latent.lerp(zero, z1, torch.linspace(0, 1, 5, dtype=torch.float64)))


def test_slerp_keeps_the_priors_norm_and_lerp_shrinks_it():
    generator = torch.Generator().manual_seed(0)
    z0, z1 = (torch.randn(1, 28, 28, generator=generator, dtype=torch.float64) for _ in range(2))
    weights = torch.linspace(0, 1, 11, dtype=torch.float64)
    spherical, linear = latent.slerp(z0, z1, weights), latent.lerp(z0, z1, weights)
    assert spherical.shape == linear.shape == (11, 1, 28, 28)
    torch.testing.assert_close(spherical[0], z0)
    torch.testing.assert_close(spherical[-1], z1)
    root_dim = math.sqrt(z0.numel())
    norms = spherical.flatten(1).norm(dim=1) / root_dim
    assert (norms - 1).abs().max() < 0.06  # chi_D / sqrt(D) at both ends and along the arc
    assert linear[5].norm() / root_dim == pytest.approx(1 / math.sqrt(2), abs=0.06)


def test_bad_latent_options_raise_one_clear_error():
    pipe = toolkit.exact_toy("gaussian")
    x = torch.zeros(2, 2)
    for options, message in (({"method": "rk45"}, "unknown latent method 'rk45'; accepted: ddim, dpm_solver_2"),
                             ({"steps": 0}, "steps must be a positive integer"),
                             ({"eps": 1.5}, "eps must lie in"),
                             ({"rtol": 0.0}, "rtol and atol must be > 0")):
        with pytest.raises(ValueError, match=message):
            latent.encode(pipe.model, pipe.sde, x, **options)
    with pytest.raises(ValueError, match="unknown interpolation 'cubic'"):
        latent.interpolate(pipe.model, pipe.sde, x[0], x[1], kind="cubic")


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_latent_mode_reconstructs_and_interpolates_release_digits(tmp_path):
    common = ["--config", "configs/mnist_vp_release.py", "--mode", "latent", "--workdir", str(tmp_path),
              "--config.sampling.checkpoint=release/mnist_vp_release.safetensors", "--config.latent.steps=25"]
    result = run_main(*common, "--config.latent.num_images=4")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "latent" / "reconstruct_dpm_solver_2_25steps.json").read_text())
    assert len(record["rmse"]) == 4 and record["psnr_mean"] > 40 and record["nfe_encode"] == 50
    assert (tmp_path / "latent" / "reconstruct_dpm_solver_2_25steps.png").is_file()
    result = run_main(*common, "--config.latent.task=interpolate", "--config.latent.pairs=1",
                      "--config.latent.frames=5", "--config.latent.steps=10")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "latent" / "interpolate_slerp_dpm_solver_2_10steps.json").read_text())
    assert record["frames"] == 5 and record["files"]["grid"] == "interpolate_slerp_dpm_solver_2_10steps.png"


@pytest.mark.parametrize("override, message", [
    ("--config.latent.task=edit", "error: unknown latent.task 'edit'; accepted: reconstruct, interpolate"),
    ("--config.latent.method=heun", "error: latent.unknown latent method 'heun'"),
    ("--config.latent.frames=1", "error: latent.frames must be an integer >= 2"),
    ("--config.latent.kind=cubic", "error: unknown latent.kind 'cubic'; accepted: slerp, lerp"),
])
def test_bad_latent_config_gets_one_line_and_exit_2(tmp_path, override, message):
    result = run_main("--config", "configs/toy_vp.py", "--mode", "latent", "--workdir", str(tmp_path / "run"),
                      "--config.model.name=exact", "--config.data.toy_name=gaussian", override)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_latent_mode_on_point_data_writes_the_numbers(tmp_path):
    result = run_main("--config", "configs/toy_vp.py", "--mode", "latent", "--workdir", str(tmp_path),
                      "--config.model.name=exact", "--config.data.toy_name=two_gaussians",
                      "--config.latent.method=adaptive", "--config.latent.rtol=1e-8", "--config.latent.atol=1e-8")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "latent" / "reconstruct_adaptive_tol1e-08.json").read_text())
    assert record["rmse_mean"] < 1e-5 and "grid" not in record["files"]
    with np.load(tmp_path / "latent" / "reconstruct_adaptive_tol1e-08.npz") as arrays:
        assert arrays["inputs"].shape == arrays["reconstructions"].shape == arrays["latents"].shape == (8, 2)
        np.testing.assert_allclose(arrays["reconstructions"], arrays["inputs"], atol=1e-5)
    result = run_main("--config", "configs/toy_vp.py", "--mode", "latent", "--workdir", str(tmp_path),
                      "--config.model.name=exact", "--config.data.toy_name=two_gaussians",
                      "--config.latent.task=interpolate", "--config.latent.pairs=2", "--config.latent.frames=3")
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "latent" / "interpolate_slerp_dpm_solver_2_50steps.npz") as arrays:
        assert arrays["paths"].shape == (2, 3, 2)
        np.testing.assert_allclose(arrays["paths"][:, [0, -1]], arrays["inputs"].reshape(2, 2, 2), atol=1e-3)
