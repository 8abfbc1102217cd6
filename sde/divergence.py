"""Divergence beyond NaN: a training state that must not replace a good checkpoint.

A learning rate far too large can blow the weights up while the loss stays finite: with
normalisation layers the network's output stays bounded, so the loss alone looks merely
poor, and the non-finite check of the training step never fires. Saving such a state as the
newest checkpoint evicts a good one, and the next run resumes from it. Two signals, each
measured against the run's own history so that loss scales (uniform or likelihood weighting,
another data set) do not matter:

* the **loss level**: the median of the last ``window`` step losses against the lowest such
  median seen so far in the run (a median, because single-batch losses are heavy-tailed:
  under likelihood weighting one batch can be many times the typical one);
* the **weight norm**: the global L2 norm of the parameters against its value when the run
  began (the initialisation or a fine-tune's starting weights; carried across resumes in the
  checkpoint, and taken at the resumed state for checkpoints that predate it).

Either growing ``factor`` times means divergence. Training moves neither by much: the loss
median falls from its start and the weight norm of a trained network stays within a few tens
of percent of its initialisation, so a factor of 10 leaves legitimate runs far from the line.
"""
from __future__ import annotations

import collections
import statistics
from typing import Any

import torch


class TrainingDiverged(RuntimeError):
    """Training cannot go on: non-finite steps in a row, or a state judged diverged by
    ``DivergenceGuard``; nothing of the diverged state was saved."""


def weight_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of ``module``'s parameters (one host read)."""
    squares = [p.detach().float().pow(2).sum() for p in module.parameters()]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


class DivergenceGuard:
    """Tracks the loss median and the weight norm of a run; ``check`` says whether the
    current state has diverged (a reason) or not (None). ``factor`` 0 turns it off."""

    def __init__(self, factor: float, window: int = 50):
        if factor != 0 and not factor >= 2:
            raise ValueError(f"training.divergence_factor must be 0 (off) or >= 2, got {factor}")
        self.factor, self.window = float(factor), window
        self.losses: collections.deque[float] = collections.deque(maxlen=window)
        self.best_median: float | None = None
        self.reference_norm: float | None = None

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def start(self, module: torch.nn.Module) -> None:
        """Record the weight norm the run starts from (unless a resumed state carried one)."""
        if self.enabled and self.reference_norm is None:
            self.reference_norm = weight_norm(module)

    def median(self) -> float | None:
        return statistics.median(self.losses) if len(self.losses) == self.window else None

    def observe(self, loss: float) -> None:
        """Add a finite step loss; the best median is updated once a full window exists."""
        self.losses.append(loss)
        current = self.median()
        if current is not None and (self.best_median is None or current < self.best_median):
            self.best_median = current

    def check(self, module: torch.nn.Module) -> str | None:
        """Why the state of ``module`` (after the observed losses) has diverged, or None."""
        if not self.enabled:
            return None
        current = self.median()
        if current is not None and self.best_median and current > self.factor * self.best_median:
            return (f"the median loss of the last {self.window} steps, {current:.4g}, is "
                    f"{current / self.best_median:.1f}x the run's best, {self.best_median:.4g}")
        norm = weight_norm(module)
        if self.reference_norm and norm > self.factor * self.reference_norm:
            return (f"the weight norm, {norm:.4g}, is {norm / self.reference_norm:.1f}x its value when "
                    f"this run began, {self.reference_norm:.4g}")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "best_median": self.best_median,
                "reference_norm": self.reference_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses.clear()
        self.losses.extend(float(v) for v in state.get("losses", [])[-self.window:])
        self.best_median = state.get("best_median")
        self.reference_norm = state.get("reference_norm")
