"""The rule of every numeric config key: integer or real, finite, and its range.

``RULES`` gives each numeric key of ``configs/default.py`` (numbers, and tuples of numbers
such as ``model.ch_mult``) one ``Rule``; ``check_values`` applies them, so every mode refuses
a bad value in ``configuration.validate``, before any work, with one line that names the key,
the value got and what is accepted. A new numeric key needs its rule here
(``tests/test_config_values.py`` walks the default config). Sampler options are not here:
each sampler's spec types and checks its own (``sde/samplers/spec.py``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from sde.checks import require

KINDS = ("int", "real")


@dataclass(frozen=True)
class Rule:
    """What one numeric key accepts.

    kind: "int" or "real" (a real takes an int too; neither takes a bool, nor a real inf or NaN).
    low, high: the bounds (None: none); ``low_open`` / ``high_open`` exclude them.
    above: a key whose value this one must exceed (``sde.beta_max`` > ``sde.beta_min``).
    off: a value outside the range that is accepted too, with what it means ((0, "off")).
    note: why the range is what it is, or what its ends mean, said after it.
    sequence: the key holds a tuple of such numbers; ``nonempty``: at least one.
    """

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    above: str | None = None
    off: tuple[float, str] | None = None
    note: str = ""
    sequence: bool = False
    nonempty: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rule kind {self.kind!r} is not one of {KINDS}")
        if self.high is not None and self.low is None:
            raise ValueError("a rule with a high bound needs a low one (an interval)")

    def number_ok(self, value: Any, floor: float | None = None) -> bool:
        """Whether ``value`` is one accepted number (``floor``: the value of ``above``)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if self.kind == "int" else numbers.Real):
            return False
        if not (isinstance(value, numbers.Integral) or math.isfinite(value)):
            return False
        if self.off is not None and value == self.off[0]:
            return True
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return floor is None or value > floor

    def accepts(self, value: Any, floor: float | None = None) -> bool:
        """Whether ``value`` is accepted: a number, or for a sequence a tuple of them."""
        if not self.sequence:
            return self.number_ok(value, floor)
        return (isinstance(value, (tuple, list)) and (len(value) > 0 or not self.nonempty)
                and all(self.number_ok(item, floor) for item in value))

    def accepted(self, floor: float | None = None) -> str:
        """What the key accepts, in words: "a finite number > 0", "in [0, 1)", ..."""
        if self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        elif self.kind == "int" and self.low == 1 and not self.low_open:
            text = "positive integers" if self.sequence else "a positive integer"
        else:
            noun = "integer" if self.kind == "int" else "finite number"
            if self.above is not None:
                bound = f" > {self.above} ({floor:g})"
            elif self.low is not None:
                bound = f" {'>' if self.low_open else '>='} {self.low:g}"
            else:
                bound = ""
            text = f"{noun}s{bound}" if self.sequence else f"{'an' if self.kind == 'int' else 'a'} {noun}{bound}"
        if self.sequence:
            text = f"a {'non-empty ' if self.nonempty else ''}tuple of {text}"
        if self.off is not None:
            text = f"{self.off[0]:g} ({self.off[1]}) or {text}"
        return f"{text} ({self.note})" if self.note else text


def _int(low: int | None = 1, **rule: Any) -> Rule:
    return Rule("int", low=low, **rule)


def _real(**rule: Any) -> Rule:
    return Rule("real", **rule)


#: FID and KID need the covariance of a set, hence at least two images.
TWO_FOR_FID = "FID needs at least 2 images"

#: key -> its rule, for every numeric key of ``configs/default.py`` (``sampling.options`` aside).
RULES: dict[str, Rule] = {
    "seed": _int(0),
    "data.image_size": _int(off=(0, "point data sets, which have no images")),
    "data.num_channels": _int(off=(0, "point data sets, which have no images")),
    "data.classes": _int(0, sequence=True, note="labels of the data set; empty keeps all"),
    "data.toy_num_samples": _int(),
    "sde.beta_min": _real(low=0, low_open=True),
    "sde.beta_max": _real(above="sde.beta_min"),
    "sde.sigma_min": _real(low=0, low_open=True),
    "sde.sigma_max": _real(above="sde.sigma_min"),
    "sde.num_scales": _int(),
    "model.nf": _int(),
    "model.ch_mult": _int(sequence=True, nonempty=True),
    "model.num_res_blocks": _int(),
    "model.attn_resolutions": _int(sequence=True, note="feature-map sizes that get attention; empty: none"),
    "model.dropout": _real(low=0, high=1, high_open=True),
    "model.fourier_scale": _real(low=0, low_open=True),
    "model.num_layers": _int(),
    "model.ema_rate": _real(low=0, high=1, high_open=True),
    "model.num_classes": _int(0, note="0: an unconditional network"),
    "model.label_dropout": _real(low=0, high=1, high_open=True),
    "training.batch_size": _int(),
    "training.n_iters": _int(),
    "training.lr": _real(low=0, low_open=True),
    "training.warmup": _int(0),
    "training.grad_clip": _real(low=0, note="0 turns clipping off"),
    "training.eps": _real(low=0, high=1, low_open=True, high_open=True),
    "training.p2_gamma": _real(low=0, note="0 is the plain loss"),
    "training.p2_k": _real(low=0, low_open=True, note="k > 0 keeps the weight finite at SNR 0"),
    "training.log_freq": _int(),
    "training.snapshot_freq": _int(),
    "training.sample_freq": _int(),
    "training.keep_checkpoints": _int(),
    "training.max_bad_steps": _int(),
    "training.divergence_factor": _real(low=2, off=(0, "off")),
    "sampling.steps": _int(),
    "sampling.num_samples": _int(),
    "sampling.batch_size": _int(),
    "sampling.seed": _int(0),
    "sampling.guidance": _real(low=0, note="0: conditional, unguided"),
    "eval.num_samples": _int(2, note=TWO_FOR_FID),
    "eval.batch_size": _int(),
    "eval.reference_num_images": _int(2, off=(0, "all"), note=TWO_FOR_FID),
    "eval.bpd_num_images": _int(),
    "eval.bpd_repeats": _int(),
    "eval.bpd_truncation": _real(low=0, low_open=True),
    "align_steps.iterations": _int(),
    "align_steps.batch_size": _int(),
    "align_steps.learning_rate": _real(low=0, low_open=True),
    "compare.num_samples": _int(2, note=TWO_FOR_FID),
    "latent.steps": _int(),
    "latent.eps": _real(low=0, low_open=True, high=1, high_open=True),
    "latent.rtol": _real(low=0, low_open=True),
    "latent.atol": _real(low=0, low_open=True),
    "latent.num_images": _int(),
    "latent.pairs": _int(),
    "latent.frames": _int(2),
    "inverse.keep": _real(low=0, high=1),
    "inverse.factor": _int(),
    "inverse.steps": _int(2),
    "inverse.particles": _int(),
    "inverse.eps": _real(low=0, low_open=True, high=1, high_open=True),
    "inverse.num_images": _int(),
    "inverse.noise": _real(low=0),
}


def lookup(config, key: str) -> Any:
    """The value of dotted ``key`` in ``config``."""
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def check_value(config, key: str) -> None:
    """``key`` of ``config`` against its rule: one ValueError naming the key, the value got and
    what is accepted."""
    rule = RULES[key]
    value = lookup(config, key)
    floor = None if rule.above is None else lookup(config, rule.above)
    require(rule.accepts(value, floor), f"{key} must be {rule.accepted(floor)}, got {value!r}")


def check_values(config, group: str | None = None) -> None:
    """Every numeric key of ``config`` (or of its ``group``, e.g. "model") against its rule,
    in the order of ``configs/default.py`` (a key comes after the one it must exceed, which
    is so checked first); the first bad one raises."""
    for key in RULES:
        if group is None or key.startswith(f"{group}."):
            check_value(config, key)
