"""Shared fixtures: tiny trained runs (continuous VP and discrete DDPM) reused across tests."""
import pytest

from sde.testing import MNIST_DIR, make_tiny_config  # noqa: F401 (shared with bench/fault_injection.py)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(config, workdir) of a 6-step continuous VP run."""
    from sde.modes.train import train

    config = make_tiny_config()
    workdir = tmp_path_factory.mktemp("tiny_vp")
    train(config, workdir)
    return config, workdir


@pytest.fixture(scope="session")
def tiny_ddpm_run(tmp_path_factory):
    """(config, workdir) of a 6-step discrete DDPM run."""
    from sde.modes.train import train

    config = make_tiny_config(continuous=False)
    workdir = tmp_path_factory.mktemp("tiny_ddpm")
    train(config, workdir)
    return config, workdir
