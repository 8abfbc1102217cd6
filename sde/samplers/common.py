"""What every sampler shares: the counted network, the noise source and the noise-level grid.

* ``Denoiser`` wraps the noise-prediction network (``sde.network``): it counts every
  evaluation (``nfe``), calls the network in its own dtype while the samplers keep their
  state in float64 (as EDM's ``generate.py`` does), and turns the predicted noise
  into the denoised estimate (Tweedie's formula, x0 = (x - sigma eps) / alpha), optionally
  clipped to the data range [-1, 1] with eps re-derived from the clipped x0 so that every
  update stays consistent with it.
* ``NoiseSource`` is the only place randomness enters. Given a list of generators, one per
  sample, sample k draws x_T and every per-step noise from generator k alone, so image k is
  the same whatever the batch size (EDM's per-seed generators).
* ``NoiseGrid`` holds the noise levels a sampler visits: times t_0 = T > ... > t_{n-1} = eps
  with their alpha and sigma, optionally followed by the data (t = 0, alpha = 1,
  sigma = 0, log-SNR = +inf), where the network is never evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from sde import randomness
from sde.network import CountedModel

Tensor = torch.Tensor

#: ``callback(info)`` is called after every update with a dict holding ``i`` (update
#: index), ``t`` (the time x has reached, 0.0 for the data), ``x`` (the float64 state)
#: and ``x0`` (the denoised estimate used by the update, or None).
Callback = Callable[[dict[str, Any]], None]

#: x0 clipping range: images are scaled to [-1, 1] (sde/data.py).
DATA_RANGE = (-1.0, 1.0)


class Denoiser:
    """The network as the samplers see it: counted, dtype-converted, optionally clipped.

    Args:
      model: ``model(x, t) -> eps`` with ``t`` of shape [B] (``sde.network``).
      model_dtype: dtype a plain callable is called in (a module is called in its own).
      clip_x0: clip the denoised estimate to ``DATA_RANGE`` (image data).
    """

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], model_dtype: torch.dtype | None = None,
                 clip_x0: bool = False):
        self.network = CountedModel(model, dtype=model_dtype)
        self.clip_x0 = clip_x0

    @property
    def nfe(self) -> int:
        """Network evaluations so far."""
        return self.network.nfe

    def eps(self, x: Tensor, t: float) -> Tensor:
        """The network's noise prediction at the scalar time ``t``, in ``x``'s dtype."""
        return self.network(x, float(t))

    def __call__(self, x: Tensor, t: float, alpha_t: float, sigma_t: float) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) at time ``t`` where x_t = alpha_t x0 + sigma_t eps."""
        eps = self.eps(x, t)
        x0 = (x - sigma_t * eps) / alpha_t
        if self.clip_x0:
            x0 = x0.clamp(*DATA_RANGE)
            eps = (x - alpha_t * x0) / sigma_t
        return x0, eps


Generators = torch.Generator | Sequence[torch.Generator] | None


class NoiseSource:
    """Gaussian draws for a batch, per sample when given one generator per sample.

    Args:
      generator: None (torch's global RNG), one ``torch.Generator`` for the whole batch, or
        a list of generators, one per sample (sample k draws only from generator k).
      batch_size, device, dtype: of the draws (``device`` is where they are returned;
        each generator draws on its own device).
    """

    def __init__(self, generator: Generators, batch_size: int, device: torch.device,
                 dtype: torch.dtype):
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}; "
                                 "pass one generator per sample, a single generator, or None")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError("every element of the generator list must be a torch.Generator")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be None, a torch.Generator or a list of them, "
                             f"got {type(generator).__name__}")
        self.generator = generator
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype

    def _draw(self, shape: Sequence[int], generator: torch.Generator | None) -> Tensor:
        return randomness.randn(tuple(shape), generator=generator, device=self.device, dtype=self.dtype)

    def randn(self, shape: Sequence[int]) -> Tensor:
        """N(0, I) of ``shape`` (shape[0] is the batch), as float64."""
        if isinstance(self.generator, (list, tuple)):
            z = torch.stack([self._draw(shape[1:], g) for g in self.generator])
        else:
            z = self._draw(shape, self.generator)
        return z.to(torch.float64)

    def prior(self, sde, shape: Sequence[int]) -> Tensor:
        """x_T from ``sde.prior_sampling``, per sample when there is one generator each."""
        if isinstance(self.generator, (list, tuple)):
            one = (1,) + tuple(shape[1:])
            return torch.cat([sde.prior_sampling(one, generator=g, dtype=self.dtype).to(self.device)
                              for g in self.generator])
        device = None if self.generator is not None else self.device
        return sde.prior_sampling(tuple(shape), generator=self.generator, device=device,
                                  dtype=self.dtype).to(self.device)


@dataclass(frozen=True)
class NoiseGrid:
    """Noise levels visited by a sampler, first to last (float64 tensors of equal length).

    ``t`` is what the network is given; ``alpha`` and ``sigma`` are the marginal scales
    of x_t = alpha x0 + sigma z the updates use (the continuous ``sde.alpha(t)``, or the
    SDE's discrete tables for discrete grids). When the grid ends at the data its last
    entry is t = 0, alpha = 1, sigma = 0: the last update then lands on the data, and the
    network is not evaluated there.
    """

    t: Tensor
    alpha: Tensor
    sigma: Tensor

    def __len__(self) -> int:
        return len(self.t)

    @property
    def ends_at_data(self) -> bool:
        return bool(self.sigma[-1] == 0)

    @property
    def log_snr(self) -> Tensor:
        """lambda = log(alpha / sigma), +inf at the data."""
        return torch.log(self.alpha) - torch.log(self.sigma)

    def with_data(self) -> "NoiseGrid":
        """This grid followed by the data point (t = 0, alpha = 1, sigma = 0)."""
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        return NoiseGrid(torch.cat([self.t, zero]), torch.cat([self.alpha, one]),
                         torch.cat([self.sigma, zero]))

    def level(self, i: int) -> tuple[float, float, float]:
        """(t, alpha, sigma) of entry ``i`` as Python floats."""
        return float(self.t[i]), float(self.alpha[i]), float(self.sigma[i])


def report(callback: Callback | None, i: int, t: float, x: Tensor, x0: Tensor | None) -> None:
    """Call the user's per-step callback, if any."""
    if callback is not None:
        callback({"i": i, "t": t, "x": x, "x0": x0})
