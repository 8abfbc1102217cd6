"""``--mode sample`` on tiny trained checkpoints: files, per-sample seeds, every sampler."""
import json

import numpy as np
import pytest

from sde import samplers
from sde.modes.sample import sample
from sde.sdes import create_sde


def run_sample(config, workdir, method, steps, **overrides):
    config = config.copy_and_resolve_references()
    config.sampling.method = method
    config.sampling.steps = steps
    for key, value in overrides.items():
        config.sampling[key] = value
    return sample(config, workdir)


def test_sample_mode_writes_grid_npz_and_json(tiny_run):
    config, workdir = tiny_run
    record = run_sample(config, workdir, "ddim", 5, num_samples=6, batch_size=4, save_trajectory=True)
    name = "ddim_5steps_seed0"
    files = {p.name for p in (workdir / "samples").iterdir()}
    assert {f"{name}.png", f"{name}.npz", f"{name}.json", f"{name}_trajectory.png"} <= files
    images = np.load(workdir / "samples" / f"{name}.npz")["images"]
    assert images.shape == (6, 1, 28, 28) and images.dtype == np.uint8
    saved = json.loads((workdir / "samples" / f"{name}.json").read_text())
    assert saved["nfe_per_sample"] == record["nfe_per_sample"] == samplers.nfe_for_steps("ddim", 5)
    assert saved["seed"] == 0 and saved["wall_time_s"] > 0 and saved["sampler"] == "ddim"
    # every setting it ran with, defaults included, so a later default change cannot alter it
    defaults = samplers.reported_options("ddim", create_sde(config), {})
    assert saved["resolved_options"] == {**defaults, **saved["options"]}
    assert saved["resolved_options"]["eta"] == 0.0 and saved["resolved_options"]["eps"] == 1e-3


def test_image_k_does_not_depend_on_the_batch_size(tiny_run):
    config, workdir = tiny_run
    run_sample(config, workdir, "ancestral", 4, num_samples=5, batch_size=5, seed=3)
    first = np.load(workdir / "samples" / "ancestral_4steps_seed3.npz")["images"]
    run_sample(config, workdir, "ancestral", 4, num_samples=5, batch_size=2, seed=3)
    second = np.load(workdir / "samples" / "ancestral_4steps_seed3.npz")["images"]
    assert np.array_equal(first, second)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tiny_run", "tiny_ddpm_run"])
def test_every_sampler_runs_on_one_network(run, request):
    config, workdir = request.getfixturevalue(run)
    for method in samplers.available():
        record = run_sample(config, workdir, method, 4, num_samples=2, batch_size=2)
        assert record["nfe_per_sample"] > 0
        images = np.load(workdir / "samples" / f"{method}_4steps_seed0.npz")["images"]
        assert images.shape == (2, 1, 28, 28)
