"""Align Your Steps: the KL bound against its closed form on Gaussian data, the fit against
the exact optimum, and ``--mode align_steps`` end to end into ``--mode sample``."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

from sde.testing import GaussianMixtureOracle
from sde import VESDE, VPSDE, samplers
from sde.samplers import align_steps
from sde.samplers.schedules import time_steps

DIM, DATA_STD = 8, 0.5


def gaussian_problem(sde):
    oracle = GaussianMixtureOracle.gaussian(sde, [0.0] * DIM, [DATA_STD] * DIM)
    return oracle, lambda count, generator: oracle.sample(count, generator)


def exact_klub(start: float, end: float) -> float:
    """KLUB of the step start -> end for x0 ~ N(0, c^2 I_d): with k(s) = c^2 / (c^2 + s^2),
    D(y, s) = k(s) y, so D(y_s, s) - D(y_start, start) = (k(s) - k(start)) y_s - k(start) r z'
    with r^2 = start^2 - s^2 and E|.|^2 = d [(k(s) - k(start))^2 (c^2 + s^2) + k(start)^2 r^2]."""
    c2 = DATA_STD ** 2

    def k(s):
        return c2 / (c2 + s * s)

    def integrand(s):
        return s ** -3 * DIM * ((k(s) - k(start)) ** 2 * (c2 + s * s) + k(start) ** 2 * (start ** 2 - s * s))

    return integrate.quad(integrand, end, start, limit=200)[0]


def exact_optimum(levels: list[float]) -> np.ndarray:
    """The interior levels minimising the exact summed KLUB between fixed ends (scipy)."""
    top, bottom = math.log(levels[0]), math.log(levels[-1])

    def interior(logits):
        widths = np.exp(logits - logits.max())
        return top - np.cumsum(widths / widths.sum() * (top - bottom))[:-1]

    def total(logits):
        inner = np.exp(interior(logits))
        full = [levels[0], *inner, levels[-1]]
        return sum(exact_klub(a, b) for a, b in zip(full[:-1], full[1:]))

    logits = np.log(-np.diff(np.log(levels)))
    for _ in range(2):  # a restart lets Nelder-Mead re-expand its simplex
        logits = optimize.minimize(total, logits, method="Nelder-Mead",
                                   options={"maxiter": 20000, "xatol": 1e-7, "fatol": 1e-10,
                                            "adaptive": True}).x
    return interior(logits)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=["vp", "ve"])
def test_klub_estimate_matches_its_closed_form(sde):
    oracle, draw = gaussian_problem(sde)
    times = time_steps(sde, 6, "log_snr", 1e-3)
    levels = align_steps.noise_levels(sde, times).tolist()
    generator = torch.Generator().manual_seed(0)
    estimates = torch.stack([align_steps.klub(oracle, sde, times, draw, batch_size=2000,
                                              generator=generator) for _ in range(8)])
    mean, error = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    exact = torch.tensor([exact_klub(a, b) for a, b in zip(levels[:-1], levels[1:])], dtype=torch.float64)
    assert exact.sum() > 1.0  # the bound is not trivially zero on this grid
    assert torch.all((mean - exact).abs() <= 4 * error + 1e-3 * exact), (mean, exact, error)


def test_fit_reaches_the_exact_optimum_on_gaussian_data():
    sde = VPSDE()
    oracle, draw = gaussian_problem(sde)
    steps, eps = 6, 1e-3
    times, info = align_steps.fit_schedule(oracle, sde, draw, steps, eps=eps, iterations=200,
                                           batch_size=32, learning_rate=0.2)
    assert times[0] == sde.T and times[-1] == eps and torch.all(times[1:] < times[:-1])
    fitted_levels = align_steps.noise_levels(sde, times)
    initial_levels = align_steps.noise_levels(sde, time_steps(sde, steps, "log_snr", eps)).tolist()
    optimum = exact_optimum(initial_levels)
    error = np.abs(np.log(fitted_levels[1:-1].numpy()) - optimum).max()
    assert error < 0.05, (fitted_levels, np.exp(optimum))
    # the bound it reports fell well below the starting schedule's, on the same draws
    assert sum(info["klub_fitted"]) < 0.6 * sum(info["klub_initial"])
    assert info["network_evaluations"] > 0


def test_a_single_iteration_gives_an_ordered_schedule():
    sde = VPSDE()
    oracle, draw = gaussian_problem(sde)
    times, _ = align_steps.fit_schedule(oracle, sde, draw, 5, eps=1e-3, iterations=1, batch_size=4)
    assert torch.isfinite(times).all() and torch.all(times[1:] < times[:-1])


def test_fit_rejects_a_schedule_without_interior_levels():
    sde = VPSDE()
    oracle, draw = gaussian_problem(sde)
    with pytest.raises(ValueError, match="steps >= 3"):
        align_steps.fit_schedule(oracle, sde, draw, 2, eps=1e-3)


@pytest.mark.slow
def test_align_steps_mode_writes_a_schedule_that_sample_mode_uses(tiny_run):
    from main import run_mode

    config, workdir = tiny_run
    config = config.copy_and_resolve_references()
    config.sampling.method, config.sampling.steps = "dpm_solver_sde", 4
    config.align_steps.iterations, config.align_steps.batch_size = 4, 2
    record = run_mode("align_steps", config, str(workdir))
    path = workdir / "schedules" / "align_steps_4steps_eps0.001.json"
    saved = json.loads(path.read_text())
    assert saved["t"] == record["t"] and len(saved["t"]) == 4 and saved["t"][0] == 1.0
    assert saved["t"][-1] == 1e-3 and saved["initial_schedule"] == "log_snr"
    assert len(saved["klub_fitted"]) == 3 and str(path) in record["message"]
    assert saved["environment"]["device"] == "cpu"

    config.sampling.options.schedule = str(path)
    config.sampling.num_samples = config.sampling.batch_size = 2
    sampled = run_mode("sample", config, str(workdir))
    assert list(sampled["resolved_options"]["schedule"]) == saved["t"]
    config.sampling.steps = 5
    with pytest.raises(ValueError, match="has 4 times, so it needs steps=4"):
        run_mode("sample", config, str(workdir))


def test_explicit_schedule_runs_the_named_schedules_grid_exactly():
    sde = VPSDE()
    oracle, _ = gaussian_problem(sde)
    named = time_steps(sde, 7, "karras", 1e-3).tolist()
    outputs = []
    for schedule in ("karras", named, torch.tensor(named, dtype=torch.float64)):
        x, info = samplers.sample("dpm_solver_sde", oracle, sde, (16, DIM), steps=7,
                                  generator=torch.Generator().manual_seed(3), schedule=schedule)
        outputs.append(x)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert info["t"] == named + [0.0] and info["options"]["schedule"] == tuple(named)
    assert info["options"]["eps"] == 1e-3


def test_explicit_schedule_from_a_file_sets_eps_and_is_checked(tmp_path):
    sde = VPSDE()
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps({"t": [1.0, 0.5, 0.1, 0.02]}))
    resolved = samplers.resolve_options("ancestral", sde, {"schedule": str(path)}, steps=4)
    assert resolved["schedule"] == (1.0, 0.5, 0.1, 0.02) and resolved["eps"] == 0.02
    bad = {
        "needs steps=4": ({"schedule": str(path)}, 5),
        "differs from the last time": ({"schedule": str(path), "eps": 1e-3}, 4),
        "must start at T=1": ({"schedule": [0.9, 0.5, 0.1]}, 3),
        "decrease strictly": ({"schedule": [1.0, 0.5, 0.5, 0.1]}, 4),
        "non-empty sequence of times": ({"schedule": []}, 1),
        "does not exist": ({"schedule": str(tmp_path / "missing.json")}, 4),
        "unknown schedule 'cosine'": ({"schedule": "cosine"}, 4),
    }
    for message, (options, steps) in bad.items():
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            samplers.resolve_options("ancestral", sde, options, steps=steps)
    path.write_text(json.dumps([1.0, 0.5]))
    with pytest.raises(ValueError, match="list of times under 't'"):
        samplers.resolve_options("ancestral", sde, {"schedule": str(path)})
