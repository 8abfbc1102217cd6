"""Inverse problems against the closed form: for Gaussian data and a linear observation the
posterior is Gaussian; replacement is biased, SMC's error falls as its particles grow."""
from __future__ import annotations

import pytest
import torch

import sde as toolkit
from sde import inverse
from sde.data.toy import GaussianMixture
from sde.models.exact import ExactMixtureEps
from sde.sdes import VESDE, VPSDE, SubVPSDE


def conditional(mean: torch.Tensor, covariance: torch.Tensor, basis: torch.Tensor, observed: torch.Tensor,
                noise: float = 0.0):
    """The law of x ~ N(mean, covariance) given basis @ x + noise * n = observed (basis:
    orthonormal rows, n ~ N(0, I)): the Kalman update."""
    gain = covariance @ basis.T @ torch.linalg.inv(basis @ covariance @ basis.T
                                                   + noise ** 2 * torch.eye(len(basis), dtype=covariance.dtype))
    return mean + gain @ (observed - basis @ mean), covariance - gain @ basis @ covariance


def test_projectors_are_orthogonal_projections():
    generator = torch.Generator().manual_seed(0)
    u, v = (torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = inverse.random_mask((3, 8, 8), 0.4, generator)
    for projector in (inverse.Mask(mask), inverse.Mask(inverse.box_mask((3, 8, 8), 2, 2, 4, 4)),
                      inverse.Mask(inverse.half_mask((3, 8, 8), "bottom")), inverse.ChannelMean(),
                      inverse.BlockMean(2)):
        torch.testing.assert_close(projector.project(projector.project(u)), projector.project(u))  # P^2 = P
        torch.testing.assert_close((projector.project(u) * v).sum(), (u * projector.project(v)).sum())  # P^T = P
    assert mask[0].equal(mask[1]) and 0.2 < mask.double().mean() < 0.6  # the same pixels in every channel


@pytest.fixture(scope="module")
def gaussian_2d():
    pipe = toolkit.exact_toy("gaussian")
    return pipe.model, pipe.sde, pipe.model.means[0].detach(), pipe.model.covariances[0].detach()


def posterior_error(samples: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> tuple[float, float]:
    return float((samples.mean(0) - mean).norm()), float((torch.cov(samples.T) - covariance).norm())


@pytest.mark.slow
def test_replacement_is_biased_and_smc_converges_on_a_2d_gaussian(gaussian_2d):
    model, sde, mean, covariance = gaussian_2d
    observed = torch.tensor([1.0, 0.0], dtype=torch.float64)
    projector = inverse.Mask(torch.tensor([1.0, 0.0], dtype=torch.float64))
    post_mean, post_cov = conditional(mean, covariance, torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                                      observed[:1])
    count = 3000
    y = observed.expand(count, 2).clone()
    standard_error = float(post_cov[1, 1].sqrt()) / count ** 0.5
    x, info = inverse.replacement(model, sde, y, projector, steps=200, generator=torch.Generator().manual_seed(1))
    assert info["nfe"] == 200 and torch.equal(x[:, 0], y[:, 0])  # the observed value, exactly
    replacement_error, _ = posterior_error(x, post_mean, post_cov)
    assert replacement_error > 5 * standard_error  # biased even with the exact score
    errors = {}
    for particles in (1, 64):
        x, info = inverse.smc(model, sde, y, projector, steps=200, particles=particles,
                              generator=torch.Generator().manual_seed(2))
        assert info["nfe"] == 200 * particles and torch.equal(x[:, 0], y[:, 0])
        errors[particles] = posterior_error(x, post_mean, post_cov)
    assert errors[64][0] < 3.5 * standard_error < errors[1][0]
    assert errors[64][1] < 0.1 * float(post_cov[1, 1])


@pytest.mark.slow
def test_smc_colorizes_a_coloured_gaussian_image_law():
    """Colour data with a known score: 3-channel 2x2 images from a Gaussian with correlated
    channels; the grey image is observed (``ChannelMean``) and the colours are drawn."""
    generator = torch.Generator().manual_seed(3)
    dim = 12
    root = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim ** 0.5
    covariance = 0.3 * root @ root.T + 0.05 * torch.eye(dim, dtype=torch.float64)
    mean = 0.3 * torch.randn(dim, generator=generator, dtype=torch.float64)
    sde = VPSDE()
    exact = ExactMixtureEps(sde, GaussianMixture(torch.ones(1, dtype=torch.float64), mean[None], covariance[None]))

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return exact(x.flatten(1), t).reshape(x.shape)

    projector = inverse.ChannelMean()
    # A's rows: for each of the 4 pixels, (1, 1, 1) / sqrt(3) over its channels (C, H, W order)
    basis = torch.zeros(4, dim, dtype=torch.float64)
    for pixel in range(4):
        basis[pixel, [pixel, 4 + pixel, 8 + pixel]] = 3 ** -0.5
    truth = (mean + torch.linalg.cholesky(covariance) @ torch.randn(dim, generator=generator, dtype=torch.float64))
    image = truth.reshape(1, 3, 2, 2)
    post_mean, post_cov = conditional(mean, covariance, basis, basis @ truth)
    count = 3000
    y = projector.observe(image).expand(count, 3, 2, 2).clone()
    errors = {}
    for particles in (1, 32):
        x, _ = inverse.smc(model, sde, y, projector, steps=50, particles=particles,
                           generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(projector.project(x), y)  # the grey image, exactly
        errors[particles] = posterior_error(x.flatten(1), post_mean, post_cov)
    standard_error = float(post_cov.diagonal().sum().sqrt()) / count ** 0.5  # of the mean's norm
    assert errors[32][0] < 3 * standard_error < errors[1][0]  # one particle is biased; 32 are not


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_observation_level_has_the_noise_to_signal_ratio_of_the_noise(sde):
    for noise in (0.02, 0.3, 5.0):
        t, alpha, sigma = inverse.observation_level(sde, noise)
        assert 0 < t < sde.T and sigma / alpha == pytest.approx(noise, rel=1e-9)
        assert alpha == pytest.approx(float(sde.alpha(torch.tensor(t, dtype=torch.float64))), rel=1e-12)
    assert inverse.observation_level(sde, 0.0) == (0.0, 1.0, 0.0)
    for bad in (-0.1, float("nan"), 1e4):
        with pytest.raises(ValueError, match="noise"):
            inverse.observation_level(sde, bad)


@pytest.mark.slow
def test_smc_with_a_noisy_observation_converges_to_the_kalman_posterior(gaussian_2d):
    """y = x_0 + 0.15 n: the posterior is the Kalman update; the observed coordinate is
    denoised (spread around y, not pinned to it) and one particle is biased where 16 are not."""
    model, sde, mean, covariance = gaussian_2d
    noise, count, steps = 0.15, 2000, 60
    observed = torch.tensor([1.0, 0.0], dtype=torch.float64)
    projector = inverse.Mask(torch.tensor([1.0, 0.0], dtype=torch.float64))
    post_mean, post_cov = conditional(mean, covariance, torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                                      observed[:1], noise)
    y = observed.expand(count, 2).clone()
    standard_error = float(post_cov.diagonal().sum().sqrt()) / count ** 0.5
    above = sum(t > inverse.observation_level(sde, noise)[0] for t in inverse._grid(sde, steps, 1e-3).t.tolist())
    errors = {}
    for particles in (1, 16):
        x, info = inverse.smc(model, sde, y, projector, steps=steps, particles=particles, noise=noise,
                              generator=torch.Generator().manual_seed(2))
        # conditioned steps cost K evaluations each; t* adds a step, and those below it cost one
        assert info["nfe"] == above * particles + steps + 1 - above
        errors[particles] = float((x.mean(0) - post_mean).norm())
        assert 0.4 < float(x[:, 0].std() / post_cov[0, 0].sqrt()) < 1.2  # spread, not pinned to y
    assert errors[16] < 3 * standard_error < errors[1]
    # a weak observation (t* far from the data, alpha_t* = 0.71): the observation's scaling matters
    post_mean, post_cov = conditional(mean, covariance, torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                                      observed[:1], 1.0)
    x, _ = inverse.smc(model, sde, y, projector, steps=steps, particles=16, noise=1.0,
                       generator=torch.Generator().manual_seed(3))
    assert float((x.mean(0) - post_mean).norm()) < 3 * float(post_cov.diagonal().sum().sqrt()) / count ** 0.5
    # denoising (P = I) starts at x_t* = alpha* y: the Kalman posterior with B = I, at steps NFE
    everything = inverse.Mask(torch.ones(2, dtype=torch.float64))
    post_mean, post_cov = conditional(mean, covariance, torch.eye(2, dtype=torch.float64), observed, noise)
    for method in ("replacement", "smc"):
        x, info = inverse.solve(method, model, sde, y, everything, steps=steps, noise=noise,
                                generator=torch.Generator().manual_seed(4))
        assert info["nfe"] == steps
        assert float((x.mean(0) - post_mean).norm()) < 3 * float(post_cov.diagonal().sum().sqrt()) / count ** 0.5
    # a noise below the grid's last level counts as exact: the observed value is kept
    x, _ = inverse.replacement(model, sde, y, projector, steps=steps, noise=1e-4)
    assert torch.equal(x[:, 0], y[:, 0])


def test_bad_options_raise_one_clear_error(gaussian_2d):
    model, sde, _, _ = gaussian_2d
    y, projector = torch.zeros(2, 2), inverse.Mask(torch.ones(2))
    with pytest.raises(ValueError, match="unknown inverse-problem method 'dps'; accepted: replacement, smc"):
        inverse.solve("dps", model, sde, y, projector)
    with pytest.raises(ValueError, match="particles must be a positive integer"):
        inverse.smc(model, sde, y, projector, particles=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        inverse.replacement(model, sde, y, projector, steps=1)
    with pytest.raises(ValueError, match="keep must lie in"):
        inverse.random_mask((1, 4, 4), 1.5, torch.Generator())


def run_main(*args: str):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "main.py"), *args], cwd=root, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_inverse_mode_inpaints_release_digits_with_the_observed_pixels_kept(tmp_path):
    import json

    common = ["--config", "configs/mnist_vp_release.py", "--mode", "inverse", "--workdir", str(tmp_path),
              "--config.sampling.checkpoint=release/mnist_vp_release.safetensors", "--config.inverse.num_images=4",
              "--config.inverse.steps=10"]
    for extra, name in ((["--config.inverse.mask=half"], "inpaint_half_replacement_10steps"),
                        (["--config.inverse.method=smc", "--config.inverse.particles=2"],
                         "inpaint_box_smc_10steps_2particles"),
                        (["--config.inverse.task=superres"], "superres_replacement_10steps"),
                        (["--config.inverse.noise=0.2"], "inpaint_box_replacement_10steps_noise0.2"),
                        (["--config.inverse.task=denoise", "--config.inverse.noise=0.3"],
                         "denoise_replacement_10steps_noise0.3")):
        result = run_main(*common, *extra)
        assert result.returncode == 0, result.stderr
        record = json.loads((tmp_path / "inverse" / f"{name}.json").read_text())
        exact = record["noise"] == 0  # a noisy observation is denoised, not copied
        assert (record["observed_max_deviation"] < 1e-6) == exact and len(record["classifier"]["predicted"]) == 4
        assert 0.0 <= record["classifier"]["accuracy"] <= 1.0 and (tmp_path / "inverse" / f"{name}.png").is_file()
        if record["task"] == "denoise":  # the completions are nearer the originals than the observation
            assert record["rmse_to_originals"] < 0.6 * record["noise"], record["rmse_to_originals"]


@pytest.mark.parametrize("override, message", [
    ("--config.inverse.task=colorize", "error: inverse.task='colorize' needs colour images (data.num_channels=3)"),
    ("--config.inverse.method=dps", "error: unknown inverse.method 'dps'; accepted: replacement, smc"),
    ("--config.inverse.factor=3", "error: inverse.factor=3 must divide data.image_size=28"),
    ("--config.inverse.keep=1.5", "error: inverse.keep must"),
    ("--config.inverse.noise=-1", "error: inverse.noise must be a finite number >= 0"),
    ("--config.inverse.noise=500", "error: inverse.noise=500 is at or above the prior's level"),
    ("--config.inverse.task=denoise", "error: inverse.task='denoise' observes every pixel through noise"),
])
def test_bad_inverse_config_gets_one_line_and_exit_2(tmp_path, override, message):
    result = run_main("--config", "configs/mnist_vp_release.py", "--mode", "inverse", "--workdir",
                      str(tmp_path / "run"), "--config.inverse.task=superres" if "factor" in override else
                      "--config.inverse.num_images=2", override)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_colorize_mode_runs_on_cifar10_files(tmp_path, monkeypatch):
    """Colorization end to end on CIFAR-10's file format (batches written here; no download):
    the grey image is observed and kept exactly. An untrained small network stands in for a
    CIFAR-10 model, which this toolkit does not ship."""
    from configs import cifar10_vp
    from sde.data import cifar10
    from sde.models import create_model
    from sde.modes import inverse as inverse_mode
    from test_data import write_cifar

    write_cifar(tmp_path / "data", images_per_batch=2)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", {})  # the written batches are not the published files
    config = cifar10_vp.get_config()
    config.data.data_dir, config.data.download, config.eval.heldout_split = str(tmp_path / "data"), False, "test"
    config.model.nf, config.model.num_res_blocks, config.model.ch_mult = 8, 1, (1, 2)
    config.inverse.task, config.inverse.num_images, config.inverse.steps = "colorize", 2, 3
    model = create_model(config).eval()
    monkeypatch.setattr(inverse_mode, "load_ema_model", lambda *args, **kwargs: (model, "untrained", 0))
    record = inverse_mode.run(config, tmp_path / "run")
    assert record["task"] == "colorize" and record["num_images"] == 2 and record["nfe_per_image"] == 3
    assert record["observed_max_deviation"] < 1e-6 and "classifier" not in record
    assert (tmp_path / "run" / "inverse" / record["files"]["grid"]).is_file()
