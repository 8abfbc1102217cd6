"""Shared fixtures: tiny trained runs (continuous VP and discrete DDPM) reused across tests."""
import os
from pathlib import Path

import pytest

from sde.testing import MNIST_DIR, make_tiny_config  # noqa: F401 (shared with bench/fault_injection.py)


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """The per-machine cache (reference Inception statistics) of this test session: a temporary
    folder, never the user's ~/.cache; subprocesses inherit it through the environment."""
    from sde.quality import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("user_cache"))
    yield Path(os.environ[CACHE_ENV])
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


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
