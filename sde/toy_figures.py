"""Pictures of toy data flowing into noise and back: what ``--mode sample`` draws for point data.

Forward, the data's marginals p_t are those of x_t = alpha_t x_0 + sigma_t z (Song et al.
2021, eq. 29 for the VP-SDE); a few forward paths are simulated by Euler-Maruyama steps of
dx = f(t) x dt + g(t) dw. Reverse, the configured sampler's states are recorded at every
step from the same x_T, and a few paths of the reverse SDE (Euler-Maruyama) and of the
probability-flow ODE (DDIM, its exponential-integrator form) are drawn from shared
starting points, so the stochastic and the deterministic way back can be told apart.

* 1-D data (``flow_figure_1d``): the density over time as a heat map, forward (noised data)
  and reverse (histograms of the sampler's states), the paths on top, and the exact marginal
  curves at a few times beside the histograms of the sampler's states at those times.
* 2-D data (``flow_figure_2d``): scatter snapshots at the same times, forward and reverse,
  and the SDE's and the ODE's paths over the data.

The snapshot times are those where the signal-to-noise ratio alpha_t / sigma_t takes the
values of ``SNAPSHOT_RATIOS`` (and t = 0, t = T), so the pictures read alike for every SDE.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sde import data, randomness, samplers
from sde.checkpoint import atomic_write

#: Points whose reverse states make the histograms and snapshots.
FIGURE_POINTS = 4000
#: Reverse SDE and ODE paths drawn on top (per kind), and the steps of their grids.
PATHS = 8
PATH_STEPS = 200
#: Paths drawn in 2-D, where a reverse SDE path fills its panel quickly.
PATHS_2D = 4
#: alpha_t / sigma_t at the inner snapshot times (between t = 0 and t = T).
SNAPSHOT_RATIOS = (16.0, 4.0, 1.0)
#: Forward heat-map columns (uniform in t) and histogram bins.
FORWARD_TIMES = 200
BINS = 120
#: Independent stream of the figures' forward noise (sampling's streams are seeds 0, 1, ...).
FORWARD_NOISE_SEED_OFFSET = 7919


def snapshot_times(sde) -> list[float]:
    """0, the times where alpha/sigma = ``SNAPSHOT_RATIOS``, and T (increasing); a ratio the SDE
    does not reach inside (0, T) (a VE-SDE whose sigma_min or sigma_max is far from the data's
    scale) is left out."""
    inner = sde.t_from_log_snr(torch.log(torch.tensor(SNAPSHOT_RATIOS, dtype=torch.float64)))
    return [0.0] + [float(t) for t in inner if 0.0 < float(t) < sde.T] + [float(sde.T)]


def window(sde, x0: np.ndarray) -> float:
    """Half-width of the pictures' window: 1.1 times the 99.5% quantile of |x_t| over the data
    (t = 0) and the marginal where alpha/sigma = 1, so the data's structure fills the frame; the
    prior (3 sigma_max wide for a VE-SDE) may run past it."""
    t_half = float(sde.t_from_log_snr(torch.zeros(1, dtype=torch.float64)))
    alpha, sigma = _coefficients(sde, min(max(t_half, 0.0), float(sde.T)))
    spread_at_half = np.sqrt(alpha ** 2 * np.quantile(np.abs(x0), 0.995) ** 2 + (2.8 * sigma) ** 2)
    return 1.1 * max(float(np.quantile(np.abs(x0), 0.995)), float(spread_at_half))


def _coefficients(sde, t: float) -> tuple[float, float]:
    if t == 0.0:
        return 1.0, 0.0
    t_tensor = torch.tensor([t], dtype=torch.float64)
    return float(sde.alpha(t_tensor)), float(sde.sigma(t_tensor))


def forward_marginal_samples(sde, x0: torch.Tensor, times, generator: torch.Generator) -> list[np.ndarray]:
    """Draws of p_t at each of ``times``: alpha_t x0 + sigma_t z with fresh z per time."""
    out = []
    for t in times:
        alpha, sigma = _coefficients(sde, t)
        noise = randomness.randn(x0.shape, generator=generator, dtype=torch.float64)
        out.append((alpha * x0.to(torch.float64) + sigma * noise).numpy())
    return out


def forward_paths(sde, x0: torch.Tensor, times: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """[len(times), N, D] Euler-Maruyama paths of the forward SDE dx = f x dt + g dw from x0."""
    x = x0.to(torch.float64).clone()
    path = [x.numpy().copy()]
    for t0, t1 in zip(times[:-1], times[1:]):
        t = torch.tensor([t0], dtype=torch.float64)
        dt = float(t1 - t0)
        drift = float(sde.drift_coef(t)) * x
        x = x + drift * dt + math.sqrt(float(sde.diffusion_sq(t)) * dt) * randomness.randn(
            x.shape, generator=generator, dtype=torch.float64)
        path.append(x.numpy().copy())
    return np.stack(path)


def reverse_states(model, sde, method: str, steps: int, options: dict[str, Any], x_T: torch.Tensor,
                   generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(times [F], states [F, N, D]) of sampler ``method`` from ``x_T``: x_T at T, then the state
    after every update, ending with the returned samples at t = 0."""
    times, states = [float(sde.T)], [x_T.double().cpu().numpy()]

    def keep(state: dict[str, Any]) -> None:
        times.append(float(state["t"]))
        states.append(state["x"].detach().double().cpu().numpy())

    options = {**options, "callback": keep, "disable": True}
    x, _ = samplers.sample(method, model, sde, tuple(x_T.shape), steps=steps, generator=generator,
                           x_T=x_T, **options)
    final = x.detach().double().cpu().numpy()
    if times[-1] != 0.0 or not np.array_equal(states[-1], final):
        times.append(0.0)
        states.append(final)
    return np.asarray(times), np.stack(states)


def _prior_draws(sde, count: int, dim: int, seed: int, device) -> tuple[torch.Tensor, torch.Generator]:
    """x_T of ``count`` points and the generator (seeded by ``seed``) that goes on to draw the
    sampler's noise: one generator for the batch, as the figures need no per-sample seeds."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return sde.prior_sampling((count, dim), generator=generator, device=device, dtype=torch.float64), generator


def path_pair(model, sde, dim: int, seed: int, device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``PATHS`` reverse paths each of the reverse SDE (Euler-Maruyama) and of the probability-flow
    ODE (DDIM, eta = 0) on ``PATH_STEPS``-step grids, from the same x_T."""
    x_T, generator = _prior_draws(sde, PATHS, dim, seed, device)
    return {"reverse SDE (Euler-Maruyama)": reverse_states(model, sde, "euler_maruyama", PATH_STEPS, {}, x_T,
                                                           generator),
            "probability-flow ODE (DDIM)": reverse_states(model, sde, "ddim", PATH_STEPS, {}, x_T, generator)}


def _nearest(times: np.ndarray, t: float) -> int:
    return int(np.argmin(np.abs(times - t)))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def _save(figure, path: Path) -> None:
    _, plt = _plt()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    atomic_write(Path(path), lambda handle: handle.write(buffer.getvalue()))


def _edges(centres: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Cell edges around increasing ``centres`` (midpoints; the ends clipped to [low, high])."""
    middle = 0.5 * (centres[1:] + centres[:-1])
    first = centres[0] - (middle[0] - centres[0]) if low is None else low
    last = centres[-1] + (centres[-1] - middle[-1]) if high is None else high
    return np.concatenate([[first], middle, [last]])


def flow_figure_1d(*, sde, x0: np.ndarray, reverse: tuple[np.ndarray, np.ndarray],
                   paths: dict[str, tuple[np.ndarray, np.ndarray]], mixture=None, title: str,
                   path: Path, seed: int = 0) -> None:
    """Forward and reverse density heat maps with paths, and marginals at the snapshot times.

    ``x0``: [N, 1] data; ``reverse``: (times, states [F, N, 1]) of the sampler; ``paths``:
    label -> (times, states [F, P, 1]); ``mixture``: the data's ``GaussianMixture`` when known
    (its exact marginals are drawn as curves).
    """
    matplotlib, plt = _plt()
    generator = torch.Generator().manual_seed(seed + FORWARD_NOISE_SEED_OFFSET)
    T = float(sde.T)
    forward_t = np.linspace(0.0, T, FORWARD_TIMES)
    x0_tensor = torch.as_tensor(x0, dtype=torch.float64)
    forward = forward_marginal_samples(sde, x0_tensor, forward_t, generator)
    rev_t, rev_x = reverse
    spread = window(sde, x0)
    low, high = -spread, spread
    bins = np.linspace(low, high, BINS + 1)

    def heat(samples) -> np.ndarray:
        # points outside the window are left out (clipping would pile them into the edge bins);
        # the density stays that of all points
        return np.stack([np.histogram(s[:, 0], bins=bins)[0] / (len(s) * np.diff(bins)) for s in samples])

    forward_heat, reverse_heat = heat(forward), heat(rev_x)
    top = np.quantile(np.concatenate([forward_heat.ravel(), reverse_heat.ravel()]), 0.995)
    norm = matplotlib.colors.PowerNorm(gamma=0.5, vmin=0.0, vmax=top)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    forward_ax, reverse_ax, marginal_ax = axes
    forward_ax.pcolormesh(_edges(forward_t, 0.0, T), bins, forward_heat.T, cmap="magma", norm=norm,
                          shading="flat", rasterized=True)
    walk = forward_paths(sde, x0_tensor[:PATHS], forward_t, generator)
    for k in range(walk.shape[1]):
        forward_ax.plot(forward_t, walk[:, k, 0], color="white", lw=0.7, alpha=0.8)
    forward_ax.set(title="forward: data -> noise (p_t, paths of the SDE)", xlabel="t", ylabel="x",
                   xlim=(0, T), ylim=(low, high))
    # reverse: time runs from T (left) to 0 (right), as the sampler goes
    order = np.argsort(rev_t)
    reverse_ax.pcolormesh(_edges(rev_t[order], 0.0, T), bins, reverse_heat[order].T, cmap="magma",
                          norm=norm, shading="flat", rasterized=True)
    for (label, (times, states)), colour, style in zip(paths.items(), ("white", "cyan"), ("-", "--")):
        for k in range(states.shape[1]):
            reverse_ax.plot(times, states[:, k, 0], color=colour, lw=0.8, ls=style, alpha=0.9,
                            label=label if k == 0 else None)
    reverse_ax.set(title=f"reverse: {title}", xlabel="t", xlim=(T, 0), ylim=(low, high))
    reverse_ax.legend(fontsize=7, loc="lower left")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    grid_x = np.linspace(low, high, 600)
    marginal_bins = np.linspace(low, high, BINS // 2 + 1)
    for index, t in enumerate(snapshot_times(sde)):
        nearest = _nearest(rev_t, t)
        shown = float(rev_t[nearest])
        colour = colours[index % len(colours)]
        states = rev_x[nearest][:, 0]
        counts, _ = np.histogram(states, bins=marginal_bins)
        marginal_ax.stairs(counts / (len(states) * np.diff(marginal_bins)), marginal_bins, color=colour, lw=1.0)
        if mixture is not None:
            alpha, sigma = _coefficients(sde, shown)
            density = mixture.noised(alpha, sigma).log_prob(torch.as_tensor(grid_x)[:, None]).exp().numpy()
            marginal_ax.plot(grid_x, density, color=colour, lw=1.2, ls="--")
        marginal_ax.plot([], [], color=colour, label=f"t = {shown:.3g}")
    marginal_ax.set(title="sampler's states" + (" vs the exact p_t (dashed)" if mixture is not None else ""),
                    xlabel="x", ylabel="density", xlim=(low, high))
    marginal_ax.legend(fontsize=7)
    _save(figure, path)


def flow_figure_2d(*, sde, x0: np.ndarray, reverse: tuple[np.ndarray, np.ndarray],
                   paths: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: Path,
                   seed: int = 0) -> None:
    """Scatter snapshots forward (noised data) and reverse (the sampler's states) at the
    snapshot times, and the SDE's and the ODE's reverse paths over the data."""
    _, plt = _plt()
    generator = torch.Generator().manual_seed(seed + FORWARD_NOISE_SEED_OFFSET)
    times = snapshot_times(sde)
    forward = forward_marginal_samples(sde, torch.as_tensor(x0, dtype=torch.float64), times, generator)
    rev_t, rev_x = reverse
    columns = len(times) + 1
    figure, axes = plt.subplots(2, columns, figsize=(2.4 * columns, 5.0), dpi=100)
    for column, t in enumerate(times):
        nearest = _nearest(rev_t, t)
        # each time its own window (the data's scale at t = 0, the prior's at T), shared by both rows
        spread = 1.1 * float(np.quantile(np.abs(forward[column]), 0.995))
        for row, (points, label) in enumerate(((forward[column], f"forward t = {t:.3g}"),
                                               (rev_x[nearest], f"reverse t = {rev_t[nearest]:.3g}"))):
            axis = axes[row, column]
            axis.scatter(points[:, 0], points[:, 1], s=0.5, c="C0" if row == 0 else "C1", alpha=0.6,
                         rasterized=True)
            axis.set(title=label, xlim=(-spread, spread), ylim=(-spread, spread))
            axis.title.set_fontsize(8)
    spread = window(sde, x0)
    for row, (label, (times_k, states)) in enumerate(paths.items()):
        axis = axes[row, -1]
        axis.scatter(x0[:, 0], x0[:, 1], s=0.3, c="0.8", rasterized=True)
        for k in range(min(states.shape[1], PATHS_2D)):
            axis.plot(states[:, k, 0], states[:, k, 1], lw=0.6)
            axis.plot(states[-1, k, 0], states[-1, k, 1], "k.", ms=3)
        axis.set(title=label, xlim=(-spread, spread), ylim=(-spread, spread))
        axis.title.set_fontsize(7)
    for axis in axes.ravel():
        axis.set(aspect="equal", xticks=[], yticks=[])
    figure.suptitle(f"{title}: data -> noise (top), noise -> data (bottom)", fontsize=9)
    _save(figure, path)


def flow_figure(config, model, sde, device, options: dict[str, Any], path: Path) -> None:
    """The toy flow figure of the configured data, sampler and seed (1-D or 2-D), to ``path``."""
    cfg = config.sampling
    x0, _ = data.load_dataset(config)
    x0 = x0[:FIGURE_POINTS]
    dim = x0.shape[1]
    x_T, generator = _prior_draws(sde, FIGURE_POINTS, dim, cfg.seed, device)
    with torch.no_grad():
        reverse = reverse_states(model, sde, cfg.method, cfg.steps, options, x_T, generator)
        paths = path_pair(model, sde, dim, cfg.seed, device)
    title = f"{cfg.method}, {cfg.steps} steps"
    if dim == 1:
        name = config.data.toy_name
        mixture = data.toy_mixture(name) if name in data.CLOSED_FORM_NAMES else None
        flow_figure_1d(sde=sde, x0=x0.numpy(), reverse=reverse, paths=paths, mixture=mixture, title=title,
                       path=path, seed=cfg.seed)
    elif dim == 2:
        flow_figure_2d(sde=sde, x0=x0.numpy(), reverse=reverse, paths=paths, title=title, path=path,
                       seed=cfg.seed)
    else:
        raise ValueError(f"flow figures draw 1-D or 2-D points, got dimension {dim}")
