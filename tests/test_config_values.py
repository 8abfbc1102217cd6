"""Every numeric config key has a rule (sde/config_rules.py), every rule refuses its bad values
in ``configuration.validate`` with one line naming the key, and takes its good ones; the
shipped configs pass; sampler options and explicit schedules refuse non-finite numbers."""
import importlib
import re
from pathlib import Path

import pytest

from configs import default, tiny, toy_vp
from sde import configuration, samplers
from sde.config_rules import RULES, check_values, lookup
from sde.samplers.schedules import resolve_schedule
from sde.sdes import VPSDE

ROOT = Path(__file__).resolve().parents[1]
#: Every config file shipped in configs/.
SHIPPED = sorted(path.stem for path in (ROOT / "configs").glob("*.py") if path.stem != "__init__")
NAN, INF = float("nan"), float("inf")

#: key -> values its rule must refuse. Int keys take a bool (True is an int in Python) but
#: no float: the config's own typing refuses a float there before any rule runs.
BAD: dict[str, tuple] = {
    "seed": (-1, True),
    "data.image_size": (-1, True),
    "data.num_channels": (-3, False),
    "data.classes": ((-1,), (True,), (1.0,)),
    "data.toy_num_samples": (0, -5, True),
    "sde.beta_min": (0.0, -0.1, NAN, INF),
    "sde.beta_max": (0.05, 0.1, NAN, INF),
    "sde.sigma_min": (0.0, -1.0, NAN, -INF),
    "sde.sigma_max": (0.005, NAN, INF),
    "sde.num_scales": (0, -1, True),
    "model.nf": (0, -8, True),
    "model.ch_mult": ((), (0,), (1, -2), (True, 2), (1, 2.0)),
    "model.num_res_blocks": (0, True),
    "model.attn_resolutions": ((0,), (-7,), (True,), (7.5,)),
    "model.dropout": (1.0, 1.5, -0.1, NAN, INF),
    "model.fourier_scale": (0.0, -16.0, NAN, INF),
    "model.num_layers": (0, True),
    "model.ema_rate": (1.0, -0.5, NAN, INF),
    "model.num_classes": (-1, -10),
    "model.label_dropout": (1.0, -0.1, NAN),
    "training.batch_size": (0, -1, True),
    "training.n_iters": (0, -5, True),
    "training.lr": (0.0, -1e-4, NAN, INF),
    "training.warmup": (-1, True),
    "training.grad_clip": (-1.0, NAN, INF),
    "training.eps": (0.0, 1.0, -1e-5, NAN, INF),
    "training.p2_gamma": (-1.0, NAN, INF),
    "training.p2_k": (0.0, -1.0, NAN),
    "training.log_freq": (0, True),
    "training.snapshot_freq": (0, True),
    "training.sample_freq": (0, True),
    "training.keep_checkpoints": (0, True),
    "training.max_bad_steps": (0, True),
    "training.divergence_factor": (1.0, 1.99, -1.0, NAN, INF),
    "sampling.steps": (0, True),
    "sampling.num_samples": (0, True),
    "sampling.batch_size": (0, True),
    "sampling.seed": (-1, True),
    "sampling.guidance": (-0.5, NAN, INF),
    "eval.num_samples": (0, 1, True),
    "eval.batch_size": (0, True),
    "eval.reference_num_images": (-1, 1, True),
    "eval.bpd_num_images": (0, True),
    "eval.bpd_repeats": (0, True),
    "eval.bpd_truncation": (0.0, -1.0, NAN, INF),
    "align_steps.iterations": (0, True),
    "align_steps.batch_size": (0, True),
    "align_steps.learning_rate": (0.0, -0.1, NAN, INF),
    "compare.num_samples": (0, 1, True),
    "latent.steps": (0, True),
    "latent.eps": (0.0, 1.0, -1e-3, NAN, INF),
    "latent.rtol": (0.0, -1e-5, NAN, INF),
    "latent.atol": (0.0, NAN),
    "latent.num_images": (0, True),
    "latent.pairs": (0, True),
    "latent.frames": (1, 0, True),
    "inverse.keep": (-0.1, 1.5, NAN),
    "inverse.factor": (0, True),
    "inverse.steps": (1, 0, True),
    "inverse.particles": (0, True),
    "inverse.eps": (0.0, 1.0, NAN),
    "inverse.num_images": (0, True),
    "inverse.noise": (-0.1, NAN, INF),
}

#: key -> values its rule must take, other than the tiny config's own (the ends of ranges,
#: and the values that mean "off" or "all").
GOOD: dict[str, tuple] = {
    "seed": (0, 2**40),
    "data.image_size": (28,),
    "data.num_channels": (1,),
    "data.classes": ((), (0, 9)),
    "data.toy_num_samples": (1,),
    "sde.beta_min": (1e-4, 19.9),
    "sde.beta_max": (0.2, 50),
    "sde.sigma_min": (1e-3,),
    "sde.sigma_max": (0.02, 380.0),
    "sde.num_scales": (1,),
    "model.nf": (1,),
    "model.ch_mult": ((1,), (1, 2, 2, 2), [1, 2]),
    "model.num_res_blocks": (3,),
    "model.attn_resolutions": ((), (28, 14)),
    "model.dropout": (0.0, 0.999),
    "model.fourier_scale": (1e-3, 30),
    "model.num_layers": (1,),
    "model.ema_rate": (0.0, 0.9999),
    "model.num_classes": (0, 10),
    "model.label_dropout": (0.0, 0.2),
    "training.batch_size": (1,),
    "training.n_iters": (1,),
    "training.lr": (1e-8, 1),
    "training.warmup": (0,),
    "training.grad_clip": (0.0, 1e6),
    "training.eps": (1e-9, 0.5),
    "training.p2_gamma": (0.0, 1.0),
    "training.p2_k": (1.0, 1e-3),
    "training.log_freq": (1,),
    "training.snapshot_freq": (1,),
    "training.sample_freq": (1,),
    "training.keep_checkpoints": (1,),
    "training.max_bad_steps": (1,),
    "training.divergence_factor": (0.0, 2.0, 100),
    "sampling.steps": (1,),
    "sampling.num_samples": (1,),
    "sampling.batch_size": (1,),
    "sampling.seed": (0, 7),
    "sampling.guidance": (0.0, 2.5),
    "eval.num_samples": (2,),
    "eval.batch_size": (1,),
    "eval.reference_num_images": (0, 2),
    "eval.bpd_num_images": (1,),
    "eval.bpd_repeats": (4,),
    "eval.bpd_truncation": (1e-3, 3.0),
    "align_steps.iterations": (1,),
    "align_steps.batch_size": (1,),
    "align_steps.learning_rate": (1e-4, 1),
    "compare.num_samples": (2,),
    "latent.steps": (1,),
    "latent.eps": (1e-6, 0.5),
    "latent.rtol": (1e-10, 0.1),
    "latent.atol": (1e-10,),
    "latent.num_images": (1,),
    "latent.pairs": (1,),
    "latent.frames": (2,),
    "inverse.keep": (0.0, 1.0),
    "inverse.factor": (1,),
    "inverse.steps": (2,),
    "inverse.particles": (1,),
    "inverse.eps": (1e-5,),
    "inverse.num_images": (1,),
    "inverse.noise": (0.0, 0.1),
}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_keys(config, prefix=""):
    """The dotted keys of ``config`` holding a number or a tuple of numbers (empty ones too),
    ``sampling.options`` aside: the samplers' specs type and check those."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if hasattr(value, "items"):
            if path != "sampling.options":
                yield from numeric_keys(value, f"{path}.")
            continue
        if is_number(value) or (isinstance(value, (tuple, list)) and all(map(is_number, value))):
            yield path


def set_value(config, key: str, value):
    *groups, leaf = key.split(".")
    node = config
    for group in groups:
        node = node[group]
    node[leaf] = value
    return config


def case_id(value) -> str:
    return repr(value)


def test_every_numeric_key_of_the_default_config_has_a_rule():
    """A new numeric key fails here until it gets its rule in sde/config_rules.py."""
    keys = list(numeric_keys(default.get_default_config()))
    missing = [key for key in keys if key not in RULES]
    assert not missing, f"numeric config keys without a rule (add them to sde/config_rules.RULES): {missing}"
    assert "model.ch_mult" in keys and "data.classes" in keys and "training.lr" in keys


def test_every_rule_is_of_a_key_of_the_default_config():
    config = default.get_default_config()
    assert set(RULES) == set(numeric_keys(config)), set(RULES) ^ set(numeric_keys(config))
    for key, rule in RULES.items():
        if rule.above is not None:  # the key it must exceed is checked first
            assert list(RULES).index(rule.above) < list(RULES).index(key)


def test_every_rule_has_bad_and_good_cases():
    assert set(BAD) == set(RULES) == set(GOOD)


@pytest.mark.parametrize("key, value", [(key, value) for key, values in BAD.items() for value in values],
                         ids=lambda item: item if isinstance(item, str) else case_id(item))
def test_a_bad_value_is_refused_naming_the_key(key, value):
    config = set_value(tiny.get_config(), key, value)
    with pytest.raises(ValueError) as caught:
        configuration.validate(config)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{key} must be "), message
    assert message.endswith(f", got {lookup(config, key)!r}"), message


@pytest.mark.parametrize("key, value", [(key, value) for key, values in GOOD.items() for value in values],
                         ids=lambda item: item if isinstance(item, str) else case_id(item))
def test_a_good_value_passes(key, value):
    configuration.validate(set_value(tiny.get_config(), key, value))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_pass_every_rule(name):
    module = importlib.import_module(f"configs.{name}")
    check_values(module.get_config() if hasattr(module, "get_config") else module.get_default_config())


def test_messages_say_what_is_accepted():
    """The examples of the rules' words: the range, what 0 means where it means something."""
    cases = {("training.lr", NAN): "training.lr must be a finite number > 0, got nan",
             ("training.grad_clip", -1.0): "training.grad_clip must be a finite number >= 0 (0 turns clipping off), "
                                           "got -1.0",
             ("training.batch_size", 0): "training.batch_size must be a positive integer, got 0",
             ("training.eps", 1.0): "training.eps must be in (0, 1), got 1.0",
             ("sde.beta_max", 0.05): "sde.beta_max must be a finite number > sde.beta_min (0.1), got 0.05",
             ("training.divergence_factor", 1.5): "training.divergence_factor must be 0 (off) or a finite number "
                                                  ">= 2, got 1.5",
             ("model.ch_mult", ()): "model.ch_mult must be a non-empty tuple of positive integers, got ()",
             ("training.warmup", True): "training.warmup must be an integer >= 0, got True"}
    for (key, value), message in cases.items():
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            configuration.validate(set_value(tiny.get_config(), key, value))


def test_the_model_rules_hold_where_the_network_is_built_without_validate():
    from sde.models import create_model

    with pytest.raises(ValueError, match=r"^model\.ema_rate must be in \[0, 1\), got nan$"):
        create_model(set_value(tiny.get_config(), "model.ema_rate", NAN))


def test_point_data_takes_no_image_shape():
    """toy_vp says image_size = num_channels = 0 (its points have none); images must have one."""
    configuration.validate(toy_vp.get_config())
    with pytest.raises(ValueError, match=r"mnist images are 28x28 .* image_size=0"):
        configuration.validate(set_value(tiny.get_config(), "data.image_size", 0))


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=case_id)
def test_every_real_sampler_option_refuses_non_finite_values(value):
    """A float option of any sampler (eps, eta, snr, rtol, atol, ...) is finite."""
    sde = VPSDE()
    checked = 0
    for name, spec in samplers.SAMPLERS.items():
        for key, option in spec.all_options.items():
            if option.type is float:
                with pytest.raises(ValueError, match=rf"^{key} must be a finite number, got {value!r}$"):
                    samplers.resolve_options(name, sde, {key: value})
                checked += 1
    assert checked >= len(samplers.SAMPLERS) + 3  # eps of each, and eta, snr, rtol, atol


@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [0.0, -1e-5])
def test_ode_tolerances_are_positive(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be positive, got {value!r}$"):
        samplers.resolve_options("ode", VPSDE(), {name: value})


@pytest.mark.parametrize("times, message", [
    ([1.0, NAN, 0.1, 1e-3], "times must be finite numbers"),
    ([1.0, 0.5, NAN], "times must be finite numbers"),
    ([NAN, 0.5, 1e-3], "times must be finite numbers"),
    ([1.0, INF, 1e-3], "times must be finite numbers"),
    ([1.0, 0.3, 0.5, 1e-3], "must decrease strictly from T to a time > 0"),
    ([1.0, 0.5, 0.5, 1e-3], "must decrease strictly from T to a time > 0"),
    ([1.0, 0.5, 0.0], "must decrease strictly from T to a time > 0"),
    ([1.0, 0.5, -1e-3], "must decrease strictly from T to a time > 0"),
    ([2.0, 0.5, 1e-3], "must start at T=1"),
], ids=case_id)
def test_an_explicit_schedule_is_finite_within_the_time_range_and_strictly_decreasing(times, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_schedule(VPSDE(), times)


def test_a_good_explicit_schedule_passes():
    assert resolve_schedule(VPSDE(), [1.0, 0.5, 1e-3]) == (1.0, 0.5, 1e-3)
