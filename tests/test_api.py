"""The Python API: ``sde.load`` rebuilds the shipped models from their files alone, and its
samples and likelihoods are those of the command line's code at the same settings."""
from pathlib import Path

import numpy as np
import pytest
import torch

import sde
from configs import mnist_vp_release, mnist_vp_release_lw
from sde import likelihood, samplers
from sde.generation import sample_generators

ROOT = Path(__file__).resolve().parents[1]
RELEASES = [("release/mnist_vp_release.safetensors", mnist_vp_release),
            ("release/mnist_vp_release_lw.safetensors", mnist_vp_release_lw)]


@pytest.fixture(scope="module")
def release():
    return sde.load(ROOT / RELEASES[0][0])


@pytest.mark.parametrize("path, module", RELEASES, ids=["release", "release_lw"])
def test_shipped_weights_load_from_the_file_alone(path, module):
    pipe = sde.load(ROOT / path)
    expected = module.get_config()
    assert pipe.step == expected.training.n_iters
    for group in ("sde", "model", "data", "training"):
        for key, value in expected[group].items():
            if key in ("init_weights", "data_dir"):
                continue
            if key == "amp":  # the release's metadata says True, the bf16 of older configs
                from sde.modes.train import precision
                assert precision(pipe.config[group][key]) == precision(value)
                continue
            stored = pipe.config[group][key]
            assert (list(stored) if isinstance(stored, tuple) else stored) == \
                (list(value) if isinstance(value, tuple) else value), f"{group}.{key}"
    assert isinstance(pipe.sde, sde.VPSDE) and pipe.shape == (1, 28, 28)
    assert not pipe.model.training and pipe.device == torch.device("cpu")
    # the metadata names nothing outside the repository
    assert pipe.config.data.data_dir == "data" and not Path(pipe.config.data.data_dir).is_absolute()


def test_samples_are_the_samplers_with_per_sample_seeds(release):
    x, info = release.sample(3, method="ddim", steps=3, seed=7)
    expected, _ = samplers.sample("ddim", release.model, release.sde, (3, 1, 28, 28), steps=3,
                                  generator=sample_generators(7, 0, 3, release.device))
    assert info["nfe"] == 3 and torch.equal(x, expected)
    # sample k is drawn from generator (seed, k) whatever the batches (up to the network's
    # float32 arithmetic, which depends on the batch size)
    in_batches_of_two, _ = release.sample(3, method="ddim", steps=3, seed=7, batch_size=2)
    torch.testing.assert_close(in_batches_of_two, x, rtol=0, atol=1e-3)
    images = release.to_uint8(x)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 28, 28)


def test_sample_defaults_to_the_configs_sampler(release):
    _, info = release.sample(1, steps=2)
    assert info["sampler"] == release.config.sampling.method == "ancestral"


@pytest.mark.slow
def test_bits_per_dim_of_held_out_digits_is_the_likelihood_modules(release):
    images, _ = release.dataset("train5k")
    batch = images[::1000][:2]
    options = dict(rtol=1e-3, atol=1e-3, generator=torch.Generator().manual_seed(0))
    mean, standard_error, info = release.bits_per_dim(batch, **options)
    options["generator"] = torch.Generator().manual_seed(0)
    direct, _, _ = likelihood.bits_per_dim(release.model, release.sde, batch, **options)
    assert mean == direct
    # a trained MNIST model: well below 8 bits (uniform noise) and above 0 (a bound on -log2 P)
    assert 0.5 < mean < 3.0 and info["per_image"].shape == (2, 1)


def test_a_run_directory_and_its_checkpoints_load(tiny_run):
    config, workdir = tiny_run
    from_run = sde.load(workdir)
    from_checkpoint = sde.load(Path(workdir) / "checkpoints" / "checkpoint_6.pt")
    assert from_run.step == from_checkpoint.step == config.training.n_iters
    for a, b in zip(from_run.model.parameters(), from_checkpoint.model.parameters()):
        assert torch.equal(a, b)
    assert from_run.config.model.nf == config.model.nf


def test_a_run_directory_loads_its_newest_readable_checkpoint(tiny_run, tmp_path):
    """As the modes do: a damaged newest checkpoint is skipped for the one before."""
    import shutil

    _, workdir = tiny_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    newest = run / "checkpoints" / "checkpoint_6.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert sde.load(run, device="auto").step == 3


def test_load_refuses_what_it_cannot_use_with_one_line(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sde.checkpoint import CheckpointError

    with pytest.raises(FileNotFoundError, match="does not exist"):
        sde.load(tmp_path / "missing.safetensors")
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        sde.load(tmp_path / "weights.pt")
    release = ROOT / RELEASES[0][0]
    tensors = load_file(str(release))
    with safe_open(str(release), framework="pt") as handle:
        stored = handle.metadata()
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata={**stored, "step": "6001"})  # changed after export
    with pytest.raises(CheckpointError, match="are damaged: their content does not match the SHA-256 digest"):
        sde.load(damaged)
    # Files without a digest (exported before digests) are still read: their metadata is checked
    metadata = {key: value for key, value in stored.items() if key != "sha256"}
    for damage, message in [({"config": "{oops"}, "config stored in .* is damaged"),
                            ({"config": "[1, 2]"}, "config stored in .* is damaged"),
                            ({"config": json.dumps({"model": {"nf": "32"}})}, "config stored in .* is damaged"),
                            ({"step": "abc"}, "step 'abc' is not a step number")]:
        save_file(tensors, str(damaged), metadata={**metadata, **damage})
        with pytest.raises(CheckpointError, match=message) as caught:
            sde.load(damaged)
        assert "\n" not in str(caught.value)
    save_file(tensors, str(damaged), metadata={key: value for key, value in metadata.items() if key != "config"})
    with pytest.raises(ValueError, match="holds no config in its metadata; pass config="):
        sde.load(damaged)
    assert sde.load(damaged, config=mnist_vp_release.get_config()).step == 6000


def test_sample_refuses_counts_below_one(release):
    for arguments, message in [({"num_samples": 0}, "num_samples must be a positive integer, got 0"),
                               ({"num_samples": 2, "steps": 0}, "steps must be a positive integer, got 0"),
                               ({"num_samples": 2, "batch_size": -1}, "batch_size must be a positive integer")]:
        with pytest.raises(ValueError, match=message):
            release.sample(**arguments)


def test_the_configs_sampler_options_apply_when_its_sampler_is_asked_for(release):
    release = sde.Pipeline(**{**release.__dict__, "config": release.config.copy_and_resolve_references()})
    release.config.sampling.options.variance = "beta"
    for method in (None, "ancestral"):
        _, info = release.sample(1, method=method, steps=2)
        assert info["options"]["variance"] == "beta"
    _, info = release.sample(1, method="ancestral", steps=2, variance="beta_tilde")
    assert info["options"]["variance"] == "beta_tilde"


def test_fid_of_arrays_files_and_folders(tmp_path):
    """``evaluation.image_fid`` reads arrays, .npz files and PNG folders alike; with a
    feature extractor of known output its FID is the closed form of two Gaussians' moments."""
    from PIL import Image

    from evaluation import image_fid, read_images

    generator = np.random.default_rng(0)
    first = generator.integers(0, 256, (40, 1, 4, 4), dtype=np.uint8)
    second = generator.integers(0, 256, (30, 1, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "first.npz", images=first)
    folder = tmp_path / "second"
    folder.mkdir()
    for index, image in enumerate(second):
        Image.fromarray(image[0]).save(folder / f"{index:03d}.png")
    assert torch.equal(read_images(folder), torch.from_numpy(second))

    def pixels(batch):  # features = the 16 pixels as floats
        return torch.as_tensor(batch).flatten(1).double()

    result = image_fid(tmp_path / "first.npz", folder, extractor=pixels, batch_size=7)
    a, b = first.reshape(40, -1).astype(np.float64), second.reshape(30, -1).astype(np.float64)
    from scipy import linalg
    covariance_a, covariance_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(covariance_a @ covariance_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(covariance_a + covariance_b - 2 * root)
    assert result["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["num_generated"] == 40 and result["num_reference"] == 30
    with pytest.raises(ValueError, match="uint8"):
        read_images(first.astype(np.float32))


def test_bits_per_dim_uses_the_dequantization_the_config_evaluates_with(monkeypatch):
    import sde.api

    fine_tune = sde.load(ROOT / RELEASES[1][0])
    seen = {}
    monkeypatch.setattr(sde.api.likelihood, "bits_per_dim", lambda *args, **options: seen.update(options))
    fine_tune.bits_per_dim(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert (seen["dequantization"], seen["truncation"]) == ("truncated_normal", 2.0)
    fine_tune.bits_per_dim(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), dequantization="uniform")
    assert seen["dequantization"] == "uniform"
