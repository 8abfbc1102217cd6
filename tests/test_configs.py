"""Every config key is read by something; every shipped config loads and validates."""
import re
from pathlib import Path

import pytest

from configs import (cifar10_vp, default, mnist_ddpm, mnist_subvp, mnist_ve, mnist_vp, mnist_vp_release,
                     mnist_vp_release_lw, tiny, toy_vp)
from sde import samplers
from sde.configuration import validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [cifar10_vp, mnist_ddpm, mnist_subvp, mnist_ve, mnist_vp, mnist_vp_release, mnist_vp_release_lw,
           tiny, toy_vp]


def leaf_keys(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_key_is_read_by_the_toolkit():
    """Each key (outside sampling.options) is read as ``<section>.<key>`` / ``cfg.<key>`` / ``["<key>"]``."""
    source = "\n".join(path.read_text() for folder in ("sde", "evaluation") for path in
                       (ROOT / folder).rglob("*.py")) + (ROOT / "main.py").read_text()
    unread = []
    for key in leaf_keys(default.get_default_config()):
        if key.startswith("sampling.options."):
            continue
        name = key.rsplit(".", 1)[-1]
        if not re.search(rf"\.{name}\b|\[\"{name}\"\]", source):
            unread.append(key)
    assert not unread, f"config keys nothing reads: {unread}"


def test_every_sampler_option_key_is_an_option_of_some_sampler():
    accepted = set()
    for name in samplers.available():
        accepted |= set(samplers.SAMPLERS[name].options) | set(samplers.registry.COMMON_OPTIONS)
    options = default.get_default_config().sampling.options
    assert set(options.keys()) <= accepted, set(options.keys()) - accepted


@pytest.mark.parametrize("module", CONFIGS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_shipped_configs_validate(module, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in configs (release weights) are relative to the repository
    for mode in ("train", "sample", "eval"):
        validate(module.get_config(), mode)


@pytest.mark.parametrize("module, weights", [(mnist_vp_release, "release/mnist_vp_release.safetensors"),
                                             (mnist_vp_release_lw, "release/mnist_vp_release_lw.safetensors")])
def test_released_weights_load_with_their_config(module, weights):
    """The shipped weights match their config and predict the noise at t = T.

    At T, x = alpha_T x0 + sigma_T z with alpha_T ~ 0.0066 and sigma_T ~ 1, so the exact
    eps = (x - alpha_T E[x0 | x]) / sigma_T differs from x by at most about alpha_T |x0| / |x|
    <= alpha_T (pixels in [-1, 1], |x| ~ sqrt(D)); a network trained for this SDE is within a
    few alpha_T of it (measured 2.2 / 2.5 alpha_T), one trained for another SDE or data scale,
    or untrained (output ~ 0: error ~ 1), is not.
    """
    import torch

    from sde.inference import load_ema_model
    from sde.sdes import create_sde

    config = module.get_config()
    model, _, step = load_ema_model(config, "", torch.device("cpu"), str(ROOT / weights))
    assert step == config.training.n_iters
    sde = create_sde(config)
    t = torch.full((8,), sde.T)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    relative_error = ((model(x, t) - x).norm() / x.norm()).item()
    alpha_T = sde.alpha(torch.tensor(sde.T, dtype=torch.float64)).item()
    assert relative_error < 5 * alpha_T, (relative_error, alpha_T)
