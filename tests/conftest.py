"""Shared fixtures: tiny trained runs (continuous VP and discrete DDPM) reused across tests."""
from pathlib import Path

import pytest

from configs import tiny

#: The MNIST files shipped in the package (the test split and train5k), MD5-checked on read.
MNIST_DIR = Path(__file__).resolve().parents[1] / "sde" / "assets" / "mnist"


def make_tiny_config(continuous: bool = True, **training):
    """configs/tiny.py on the MNIST test split shipped in the package, offline."""
    config = tiny.get_config()
    config.data.data_dir = str(MNIST_DIR)
    config.data.split = "test"
    config.data.download = False
    config.training.continuous = continuous
    for key, value in training.items():
        config.training[key] = value
    return config


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
