"""Class-conditional networks and classifier-free guidance (sde/conditioning.py).

The exact conditional and unconditional noise predictors of a Gaussian mixture (label k =
component k, ``sde.models.exact``) make both checkable against closed forms: unguided, every
sampler must draw component k for label k; guided, the deterministic samplers must land
where a tight numerical solution of the guided probability-flow ODE does.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from conftest import make_tiny_config
from sde import conditioning, data, samplers
from sde.conditioning import Conditioned, resolve_labels
from sde.models import create_model
from sde.models.exact import ExactMixtureEps
from sde.models.mlp import ToyMLP
from sde.models.unet import UNet
from sde.network import CountedModel
from sde.sdes import VPSDE

ROOT = Path(__file__).resolve().parents[1]
TOY = "two_gaussians_1d"


def exact_conditional(sde=None) -> ExactMixtureEps:
    mixture = data.toy_mixture(TOY)
    return ExactMixtureEps(sde or VPSDE(), mixture, num_classes=len(mixture.weights)).eval()


# ---- the exact conditional model -------------------------------------------------------------

def test_exact_labels_select_a_component_and_the_null_label_is_the_mixture():
    """eps*(x, t, k) is component k's Gaussian noise prediction sigma (x - alpha mu_k) / C_k;
    the null label (and no label) gives the mixture's."""
    sde = VPSDE()
    model = exact_conditional(sde)
    mixture = data.toy_mixture(TOY)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    t = torch.full((7,), 0.4, dtype=torch.float64)
    alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
    for k in range(len(mixture.weights)):
        variance = alpha ** 2 * mixture.covariances[k, 0, 0] + sigma ** 2
        expected = sigma * (x - alpha * mixture.means[k]) / variance
        torch.testing.assert_close(model(x, t, torch.full((7,), k)), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x, t, torch.full((7,), 2)), model(x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels must be in 0..1"):
        model(x, t, torch.full((7,), 3))


# ---- w = 0: every sampler draws the class asked for ----------------------------------------------

def test_every_sampler_draws_each_class_law_unguided():
    """Labels 0 and 1 in one batch: each half has its component's mean and standard deviation
    (within 4 standard errors, plus the samplers' own bias at 100 steps)."""
    model, sde = exact_conditional(), VPSDE()
    mixture = data.toy_mixture(TOY)
    per_class = 1000
    labels = torch.arange(2 * per_class) % 2
    for method in samplers.available():
        x, _ = samplers.sample(method, Conditioned(model, labels), sde, (2 * per_class, 1), steps=100,
                               generator=torch.Generator().manual_seed(3))
        for k in range(2):
            drawn = x[labels == k, 0].double()
            mean, std = float(mixture.means[k, 0]), float(mixture.covariances[k, 0, 0].sqrt())
            standard_error = std / per_class ** 0.5
            assert abs(float(drawn.mean()) - mean) < 4 * standard_error + 0.02 * std, (method, k)
            assert abs(float(drawn.std()) / std - 1) < 4 / (2 * per_class) ** 0.5 + 0.05, (method, k)


def test_ode_likelihood_given_a_class_is_that_components_density():
    """With the exact model, -log p(x | k) by the probability-flow ODE is component k's
    Gaussian density at eps, plus the prior mismatch at T (as for the mixture, test_toy)."""
    from sde import likelihood
    from sde.data.toy import GaussianMixture

    sde, model = VPSDE(), exact_conditional()
    mixture = data.toy_mixture(TOY)
    x = torch.linspace(-2.5, 2.0, 10, dtype=torch.float64)[:, None]
    for k in range(2):
        component = GaussianMixture(torch.ones(1, dtype=torch.float64), mixture.means[k:k + 1],
                                    mixture.covariances[k:k + 1])

        def marginal(t: float):
            tensor = torch.tensor([t], dtype=torch.float64)
            return component.noised(float(sde.alpha(tensor)), float(sde.sigma(tensor)))

        logp, info = likelihood.ode_log_likelihood(Conditioned(model, torch.full((10,), k)), sde, x,
                                                   divergence="exact", rtol=1e-8, atol=1e-8)
        expected = marginal(likelihood.DEFAULT_EPS).log_prob(x) + info["prior_logp"] - marginal(sde.T).log_prob(
            info["x_T"])
        torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)


def test_generate_gives_sample_k_its_label_whatever_the_batches_and_processes():
    """generate() with labels: the same samples at batch sizes 3 and 12 and over two shards,
    and each sample on its own class's side of the two well-separated components."""
    from configs.toy_vp import get_config
    from sde.generation import generate
    from sde.models import create_model
    from sde.sdes import create_sde

    config = get_config()
    config.model.name, config.data.toy_name, config.model.num_classes = "exact", TOY, 2
    model, sde = create_model(config).eval(), create_sde(config)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1])

    def run(batch_size: int, shard=(0, 1)) -> dict[int, torch.Tensor]:
        config.sampling.batch_size = batch_size
        return {first: x for first, x, _ in generate(config, model, sde, torch.device("cpu"), num_samples=12,
                                                     seed=4, method="dpm_solver", steps=20, options={}, shard=shard,
                                                     progress=False, labels=labels, guidance=0.5)}

    whole = run(12)[0]
    torch.testing.assert_close(torch.cat(list(run(3).values())), whole, rtol=0, atol=1e-12)
    sharded = {**run(3, (0, 2)), **run(3, (1, 2))}
    torch.testing.assert_close(torch.cat([sharded[first] for first in sorted(sharded)]), whole, rtol=0, atol=1e-12)
    assert torch.equal((whole[:, 0] > -0.25).long(), labels)  # component 0 at -1.5, component 1 at 1


# ---- w > 0: the guided probability-flow ODE -------------------------------------------------------

def guided_reference(sde, x_T: np.ndarray, labels: np.ndarray, guidance: float, eps: float) -> np.ndarray:
    """The guided probability-flow ODE solved by scipy's RK45 at rtol 1e-10, written out
    from the mixture's closed form (not the toolkit's model), then the samplers' final
    denoising step x0 = (x - sigma eps_w) / alpha at t = eps.

    dx/dt = f(t) x + g(t)^2 eps_w / (2 sigma_t)  (Song et al. 2021, eq. 13, score = -eps/sigma),
    eps_w = (1 + w) eps(x, t, y) - w eps(x, t)   (Ho & Salimans 2022, eq. 6).
    """
    mixture = data.toy_mixture(TOY)
    weights = mixture.weights.numpy()
    means, variances = mixture.means[:, 0].numpy(), mixture.covariances[:, 0, 0].numpy()

    def coefficients(t: float):
        tensor = torch.tensor([t], dtype=torch.float64)
        return (float(sde.alpha(tensor)), float(sde.sigma(tensor)), float(sde.drift_coef(tensor)),
                float(sde.diffusion_sq(tensor)))

    def guided_eps(x: np.ndarray, t: float) -> np.ndarray:
        alpha, sigma, _, _ = coefficients(t)
        c = alpha ** 2 * variances + sigma ** 2                                   # [K]
        diff = x[:, None] - alpha * means[None]                                   # [N, K]
        log_w = np.log(weights)[None] - 0.5 * diff ** 2 / c - 0.5 * np.log(c)
        r = np.exp(log_w - log_w.max(1, keepdims=True))
        r /= r.sum(1, keepdims=True)
        each = sigma * diff / c
        unconditional = (r * each).sum(1)
        conditional = each[np.arange(len(x)), labels]
        return (1 + guidance) * conditional - guidance * unconditional

    def drift(t: float, x: np.ndarray) -> np.ndarray:
        _, sigma, f, g2 = coefficients(t)
        return f * x + 0.5 * g2 * guided_eps(x, t) / sigma

    solution = solve_ivp(drift, (sde.T, eps), x_T, method="RK45", rtol=1e-10, atol=1e-10)
    x = solution.y[:, -1]
    alpha, sigma, _, _ = coefficients(eps)
    return (x - sigma * guided_eps(x, eps)) / alpha


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_guided_deterministic_samplers_follow_the_guided_ode(guidance):
    """From the same x_T, the ODE samplers reach the guided ODE's end point; with w = 3 that
    end point is far from the unguided one, so a wrong combination of the two branches fails."""
    sde, model = VPSDE(), exact_conditional()
    count = 64
    labels = torch.arange(count) % 2
    x_T = torch.randn(count, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = guided_reference(sde, x_T[:, 0].numpy(), labels.numpy(), guidance, eps=1e-3)
    unguided = guided_reference(sde, x_T[:, 0].numpy(), labels.numpy(), 0.0, eps=1e-3)
    if guidance:
        assert np.abs(reference - unguided).mean() > 0.3  # guidance moves the end points
    # the first-order DDIM is the least accurate at 100 steps; a wrong guidance scale moves
    # the end points by more than 0.1
    tolerances = {"dpm_solver": 1e-2, "unipc": 1e-3, "heun": 5e-3, "ddim": 5e-2, "ode": 2e-3}
    for method, tolerance in tolerances.items():
        x, info = samplers.sample(method, Conditioned(model, labels, guidance), sde, (count, 1), steps=100,
                                  x_T=x_T.clone(), generator=torch.Generator().manual_seed(1))
        error = np.abs(x[:, 0].double().numpy() - reference).max()
        assert error < tolerance, f"{method}: max error {error:.2e} against the guided ODE"
        if method != "ode":  # adaptive: its step count is its own
            assert info["nfe"] == samplers.nfe_for_steps(method, 100) * (2 if guidance else 1), method


# ---- the wrapper and the networks ---------------------------------------------------------------

def test_guidance_is_one_batched_call_counted_as_two_evaluations():
    calls = []

    class Recorder(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            calls.append(y.tolist())
            return x * (1.0 + y[:, None].to(x.dtype))

    counted = CountedModel(Conditioned(Recorder(), torch.tensor([3, 4]), guidance=2.0))
    x = torch.ones(2, 1)
    eps = counted(x, 0.5)
    assert calls == [[3, 4, 10, 10]]  # [x; x] with [y; null], one call
    torch.testing.assert_close(eps, 3 * torch.tensor([[4.0], [5.0]]) - 2 * torch.tensor([[11.0], [11.0]]))
    assert (counted.nfe, counted.rows) == (2, 4)
    unguided = CountedModel(Conditioned(Recorder(), torch.tensor([3, 4])))
    unguided(x, 0.5)
    assert unguided.nfe == 1 and calls[-1] == [3, 4]


@pytest.mark.parametrize("network", [
    lambda classes: UNet(nf=8, ch_mult=(1, 2), attn_resolutions=(), num_classes=classes),
    lambda classes: ToyMLP(dim=2, hidden=16, num_classes=classes)])
def test_networks_take_labels_and_start_as_the_unconditional_network(network):
    """The label table starts at zero (every label is the null label until trained); a trained
    table changes the output by label; an unconditional network refuses labels."""
    torch.manual_seed(0)
    conditional = network(10).eval()
    shape = (3, 1, 28, 28) if isinstance(conditional, UNet) else (3, 2)
    x, t = torch.randn(shape), torch.rand(3)
    torch.manual_seed(0)
    plain = network(0).eval()
    plain.load_state_dict({k: v for k, v in conditional.state_dict().items() if "label" not in k})
    torch.testing.assert_close(conditional(x, t, torch.tensor([0, 5, 10])), plain(x, t))
    with torch.no_grad():  # as if trained: no zero layer left between the labels and the output
        for parameter in conditional.parameters():
            parameter.normal_(0, 0.1)
    a, b = conditional(x, t, torch.tensor([0, 0, 0])), conditional(x, t, torch.tensor([1, 1, 1]))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        conditional(x, t, torch.tensor([0, 1, 11]))


def test_labels_are_resolved_from_every_accepted_form_and_refused_otherwise():
    assert resolve_labels("", 4, 10) is None and resolve_labels(None, 4, 10) is None
    assert resolve_labels("balanced", 12, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert resolve_labels(7, 3, 10).tolist() == [7, 7, 7]
    assert resolve_labels("7", 3, 10).tolist() == [7, 7, 7]
    assert resolve_labels("1,2,3", 3, 10).tolist() == [1, 2, 3]
    assert resolve_labels((1, 2), 2, 10).tolist() == [1, 2]
    for bad, message in [(10, "outside 0..9"), (-1, "outside 0..9"), ("1,2", "2 labels for 3 samples"),
                         ("seven", "not understood"), (2.5, "not understood"), (True, "not understood"),
                         ([1.5, 2, 3], "whole numbers")]:
        with pytest.raises(ValueError, match=message):
            resolve_labels(bad, 3, 10)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        resolve_labels(3, 3, 0)


# ---- training ----------------------------------------------------------------------------------

def conditional_config(label_dropout: float):
    config = make_tiny_config()
    config.model.num_classes = 10
    config.model.label_dropout = label_dropout
    config.training.n_iters = 4
    config.training.snapshot_freq = 4
    config.training.sample_freq = 4
    return config


@pytest.mark.parametrize("label_dropout", [0.0, 0.5])
def test_label_dropout_trains_the_null_label(tmp_path, label_dropout):
    """The null label's embedding (row 10) moves from zero only when labels are dropped; the
    digits' rows move either way. With no dropout the null label never reaches the loss."""
    from sde.checkpoint import load_checkpoint
    from sde.modes.train import train

    train(conditional_config(label_dropout), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "checkpoint_4.pt")
    table = state["model"]["label_embedding.table.weight"]
    assert table[:10].abs().sum() > 0
    assert (table[10].abs().sum() > 0) == (label_dropout > 0)


def test_drop_labels_drops_at_the_rate_and_shards_like_one_process():
    from sde.modes.train import drop_labels

    labels = torch.arange(4000) % 10
    dropped = drop_labels(labels, 10, 0.2, torch.Generator().manual_seed(0), (0, 1))
    rate = float((dropped == 10).double().mean())
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / 4000) ** 0.5
    assert torch.equal(dropped[dropped != 10], labels[dropped != 10])
    halves = [drop_labels(labels[r * 2000:(r + 1) * 2000], 10, 0.2, torch.Generator().manual_seed(0), (r, 2))
              for r in range(2)]
    assert torch.equal(torch.cat(halves), dropped)


def test_model_num_classes_must_match_the_data_set():
    config = make_tiny_config()
    config.model.num_classes = 7
    with pytest.raises(ValueError, match="must be 0 .unconditional. or 10"):
        create_model(config)


# ---- the CLI ------------------------------------------------------------------------------------

def cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "main.py", *arguments], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory):
    from sde.modes.train import train

    config = conditional_config(0.2)
    workdir = tmp_path_factory.mktemp("conditional")
    train(config, workdir)
    return config, workdir


def test_sample_mode_draws_the_labels_asked_for_and_records_them(conditional_run):
    _, workdir = conditional_run
    result = cli("--config", str(ROOT / "configs" / "tiny.py"), "--mode=sample", f"--workdir={workdir}",
                 "--config.model.num_classes=10", "--config.sampling.labels=balanced",
                 "--config.sampling.guidance=1.5", "--config.sampling.num_samples=12")
    assert result.returncode == 0, result.stderr[-2000:]
    name = "ddim_4steps_seed0_balanced_w1.5"
    with np.load(workdir / "samples" / f"{name}.npz") as saved:
        assert saved["images"].shape == (12, 1, 28, 28)
        assert saved["labels"].tolist() == [k % 10 for k in range(12)]
    record = json.loads((workdir / "samples" / f"{name}.json").read_text())
    assert record["labels"] == [k % 10 for k in range(12)] and record["guidance"] == 1.5
    assert record["nfe_per_sample"] == 2 * samplers.nfe_for_steps("ddim", 4)

    one = cli("--config", str(ROOT / "configs" / "tiny.py"), "--mode=sample", f"--workdir={workdir}",
              "--config.model.num_classes=10", "--config.sampling.labels=7", "--config.sampling.num_samples=4")
    assert one.returncode == 0, one.stderr[-2000:]
    with np.load(workdir / "samples" / "ddim_4steps_seed0_class7.npz") as saved:
        assert saved["labels"].tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("arguments, message", [
    (["--config.model.num_classes=10", "--config.sampling.labels=10"], "outside 0..9"),
    (["--config.sampling.guidance=2"], "needs a class-conditional model"),
])
def test_bad_labels_get_one_line_and_exit_2(tmp_path, arguments, message):
    result = cli("--config", str(ROOT / "configs" / "tiny.py"), "--mode=sample", f"--workdir={tmp_path / 'w'}",
                 *arguments)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "w").exists()  # refused before any work


@pytest.mark.parametrize("mode", ["sample", "eval", "compare"])
@pytest.mark.parametrize("settings, message", [
    ({"model.num_classes": 10, "sampling.labels": "1,2,3"}, "3 labels for 8 samples"),
    ({"model.num_classes": 10, "sampling.guidance": 2.0}, "set sampling.labels"),
    ({"model.num_classes": 10, "sampling.labels": "balanced", "sampling.guidance": -1.0}, "sampling.guidance"),
    ({"sampling.labels": 3}, "needs a class-conditional model"),
    ({"model.num_classes": 10, "model.label_dropout": 0.0, "sampling.labels": 3, "sampling.guidance": 1.0},
     "never trained"),
    ({"model.num_classes": 10, "data.classes": (3, 5), "sampling.labels": 4}, "outside 3, 5"),
    ({"model.num_classes": 10, "sampling.labels": [[1]]}, "whole numbers"),
])
def test_every_sampling_mode_checks_the_labels_before_any_work(mode, settings, message):
    """The checks each mode runs first (main.py prints their ValueError as one line, exit 2);
    eval and compare check the labels against the number of samples they draw."""
    import importlib

    config = make_tiny_config()
    config.eval.num_samples = config.compare.num_samples = config.sampling.num_samples
    for key, value in settings.items():
        group, name = key.split(".")
        config[group][name] = value
    module = importlib.import_module({"sample": "sde.modes.sample", "eval": "sde.modes.evaluate",
                                      "compare": "sde.modes.compare"}[mode])
    with pytest.raises(ValueError, match=message):
        module.check(config)


def test_the_api_samples_by_class_and_gives_bits_per_dim_by_class(conditional_run):
    import sde

    _, workdir = conditional_run
    pipe = sde.load(workdir)
    assert pipe.num_classes == 10
    x, info = pipe.sample(4, labels=3, guidance=1.0, steps=3, method="ddim")
    assert x.shape == (4, 1, 28, 28) and info["nfe"] == 2 * samplers.nfe_for_steps("ddim", 3)
    images, labels = pipe.dataset("test")
    conditional, _, _ = pipe.bits_per_dim(images[:3], labels=labels[:3], rtol=1e-3, atol=1e-3)
    unconditional, _, _ = pipe.bits_per_dim(images[:3], rtol=1e-3, atol=1e-3)
    assert np.isfinite(conditional) and np.isfinite(unconditional)
    with pytest.raises(ValueError, match="give labels"):
        pipe.sample(2, guidance=1.0)
    with pytest.raises(ValueError, match="labels has 3 labels for 2 samples"):
        pipe.sample(2, labels=[1, 2, 3])


def test_unconditional_weights_load_and_sample_unchanged():
    """The two shipped weight files have no label table and build unconditional networks."""
    import sde

    for name in ("mnist_vp_release.safetensors", "mnist_vp_release_lw.safetensors"):
        pipe = sde.load(ROOT / "release" / name)
        assert pipe.num_classes == 0 and pipe.model.label_embedding is None
        with pytest.raises(ValueError, match="class-conditional"):
            pipe.sample(2, labels=1, steps=2)
    assert conditioning.num_classes(pipe.model) == 0


# ---- measured by class --------------------------------------------------------------------------

def test_classifier_scores_images_against_the_classes_they_were_drawn_for():
    """Real test digits with their own labels are recognised (accuracy near the classifier's
    held-out accuracy); with the labels rolled by one class, almost none are; the confusion
    matrix's rows are the classes asked for and survive a merge of two halves."""
    from evaluation.classifier import ClassifierMetrics, classifier_metrics

    config = make_tiny_config()
    images, labels = data.evaluation_subset(*data.load_dataset(config, split="test"), 300, seed=0)
    right = classifier_metrics(images, labels=labels)
    wrong = classifier_metrics(images, labels=(labels + 1) % 10)
    assert right["accuracy"] > 0.95 and wrong["accuracy"] < 0.05
    assert np.asarray(right["confusion"]).sum(1).tolist() == np.bincount(labels.numpy(), minlength=10).tolist()
    halves = [ClassifierMetrics(), ClassifierMetrics()]
    halves[0].update(images[:150], labels[:150])
    halves[1].update(images[150:], labels[150:])
    halves[0].merge(halves[1])
    assert halves[0].result()["confusion"] == right["confusion"]
    assert "accuracy" not in classifier_metrics(images)


def test_heldout_bits_per_dim_given_the_class_beside_the_unconditional(conditional_run):
    from sde.inference import load_ema_model
    from sde.modes.evaluate import heldout_metrics
    from sde.sdes import create_sde

    config, workdir = conditional_run
    config = config.copy_and_resolve_references()
    config.eval.batch_size = 2
    model, _, _ = load_ema_model(config, workdir, torch.device("cpu"))
    images, labels = data.evaluation_subset(*data.load_dataset(config, split="test"), 4, seed=0)
    report = heldout_metrics(config, model, create_sde(config), images, labels=labels)
    given = report["bpd_ode_given_class"]
    assert np.isfinite(given["mean"]) and given["nfe"] > 0
    assert given["mean"] != report["bpd_ode"]["mean"]  # the labels reached the network
    assert given["gain_over_unconditional"] == pytest.approx(report["bpd_ode"]["mean"] - given["mean"], abs=1e-9)
    assert "bpd_ode_given_class" not in heldout_metrics(config, model, create_sde(config), images)
