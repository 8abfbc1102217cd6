"""Every config key is read by something; every sampler option has its config key; every
shipped config loads and passes the checks of the modes it is for."""
import ast
import importlib
from pathlib import Path

import pytest

from configs import (cifar10_vp, default, mnist_ddpm, mnist_subvp, mnist_ve, mnist_vp, mnist_vp_release,
                     mnist_vp_release_lw, tiny, toy_vp)
from main import MODES
from sde import samplers
from sde.sdes import create_sde

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [cifar10_vp, mnist_ddpm, mnist_subvp, mnist_ve, mnist_vp, mnist_vp_release, mnist_vp_release_lw,
           tiny, toy_vp]
#: Names that hold a config group wherever they are parameters: the data sets' loaders and
#: checks take ``config.data`` as ``data``.
GROUP_PARAMETERS = {"config": (), "data": ("data",)}


def leaf_keys(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


class ConfigReads(ast.NodeVisitor):
    """The config paths a module reads: ``config.a.b``, through aliases (``cfg = config.sampling``,
    ``data, model = config.data, config.model``), ``group["key"]``, ``group.get("key")`` and
    ``group[key]`` inside ``for key in ("a", "b"):``."""

    def __init__(self):
        self.aliases: dict[str, tuple[str, ...]] = dict(GROUP_PARAMETERS)
        self.loop_keys: dict[str, tuple[str, ...]] = {}
        self.reads: set[str] = set()

    def path(self, node) -> tuple[str, ...] | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.path(node.value)
            return None if base is None else (*base, node.attr)
        return None

    def record(self, path: tuple[str, ...] | None) -> None:
        if path:
            self.reads.add(".".join(path))

    def visit_Assign(self, node):
        targets, values = node.targets[0], node.value
        if isinstance(targets, ast.Tuple) and isinstance(values, ast.Tuple):
            pairs = zip(targets.elts, values.elts)
        else:
            pairs = [(targets, values)]
        for target, value in pairs:
            path = self.path(value)
            if isinstance(target, ast.Name) and path is not None:
                self.aliases[target.id] = path
            elif isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                chain = self.path(target.value)  # config.sampling.options = options = ...
                if chain is not None:
                    for alias in node.targets[1:]:
                        if isinstance(alias, ast.Name):
                            self.aliases[alias.id] = (*chain, target.attr)
        self.generic_visit(node)

    def visit_For(self, node):
        if (isinstance(node.target, ast.Name) and isinstance(node.iter, (ast.Tuple, ast.List))
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.iter.elts)):
            self.loop_keys[node.target.id] = tuple(e.value for e in node.iter.elts)
        self.generic_visit(node)

    def visit_Attribute(self, node):
        self.record(self.path(node))
        self.generic_visit(node)

    def visit_Subscript(self, node):
        base = self.path(node.value)
        if base is not None:
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                self.record((*base, node.slice.value))
            elif isinstance(node.slice, ast.Name):
                for key in self.loop_keys.get(node.slice.id, ()):
                    self.record((*base, key))
        self.generic_visit(node)

    def visit_Call(self, node):
        if (isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args
                and isinstance(node.args[0], ast.Constant)):
            base = self.path(node.func.value)
            if base is not None:
                self.record((*base, node.args[0].value))
        self.generic_visit(node)


def config_reads(paths) -> set[str]:
    reads = set()
    for path in paths:
        visitor = ConfigReads()
        visitor.visit(ast.parse(path.read_text(), str(path)))
        reads |= visitor.reads
    return reads


def toolkit_sources():
    """The toolkit's code (sde/testing is test support: a key read only there is unread)."""
    return [*(path for path in (ROOT / "sde").rglob("*.py") if "testing" not in path.parts),
            *(ROOT / "evaluation").rglob("*.py"), ROOT / "main.py"]


def test_every_key_is_read_by_the_toolkit():
    """Each key outside sampling.options is read by its full path somewhere in the toolkit."""
    reads = config_reads(toolkit_sources())
    unread = [key for key in leaf_keys(default.get_default_config())
              if not key.startswith("sampling.options.") and key not in reads]
    assert not unread, f"config keys nothing reads: {unread}"


def test_the_key_check_fails_for_a_key_nothing_reads(tmp_path):
    """The check above can fail: a key read only as a method of a string or under another group is unread."""
    source = tmp_path / "module.py"
    source.write_text("def f(config, text):\n"
                      "    cfg = config.sampling\n"
                      "    text.split(',')\n"
                      "    return cfg.steps, config.data.dataset, config.training['lr']\n")
    reads = config_reads([source])
    assert {"sampling.steps", "data.dataset", "training.lr"} <= reads
    assert "data.split" not in reads and "split" not in reads


def test_sampler_options_and_config_keys_match_both_ways():
    """Every ``sampling.options`` key is an option of some sampler, every option a config can
    set (one with a type) has its key, and a value of the option's type, set on the config
    as the command line sets it, is what the sampler's own check accepts."""
    options = default.get_default_config().sampling.options
    settable = {key: option for spec in samplers.SAMPLERS.values()
                for key, option in spec.all_options.items() if option.type is not None}
    assert set(options.keys()) == set(settable)
    config = tiny.get_config()
    for name, spec in samplers.SAMPLERS.items():
        for key, option in spec.options.items():
            if option.type is None:
                continue
            value = option.choices[-1] if option.choices else option.default
            config.sampling.options[key] = value  # the placeholder's type takes the option's values
            assert samplers.resolve_options(name, create_sde(config), {key: config.sampling.options[key]})[key] \
                == value
            config.sampling.options[key] = None


def test_an_option_is_checked_by_its_own_sampler_alone():
    """eta is [0, 1] for ddim and any number >= 0 for dpm_solver_sde: the config accepts what
    the sampler accepts, and its error is the sampler's."""
    sample_mode = importlib.import_module(MODES["sample"])
    config = tiny.get_config()
    config.sampling.method, config.sampling.options.eta = "dpm_solver_sde", 2.0
    sample_mode.check(config)
    config.sampling.method = "ddim"
    with pytest.raises(ValueError, match=r"sampling\.options: eta must lie in \[0, 1\], got 2\.0"):
        sample_mode.check(config)


def test_compare_entries_are_read_through_the_options_types_and_checked_by_the_samplers():
    from sde.modes.compare import validate_runs

    assert samplers.parse_run("ddim:50:eta=1,schedule=quadratic") == (
        "ddim", 50, {"eta": 1.0, "schedule": "quadratic"})
    assert samplers.parse_run("dpm_solver_sde:10:eta=2.5,order=1,discrete=true") == (
        "dpm_solver_sde", 10, {"eta": 2.5, "order": 1, "discrete": True})
    for entry, message in [("ddim", "not 'method:steps'"), ("ddim:x", "not 'method:steps'"),
                           ("nope:10", "unknown sampler 'nope'"), ("ddim:10:eta", "is not key=value"),
                           ("ddim:10:snr=0.1", r"unknown option\(s\) snr for sampler 'ddim'"),
                           ("dpm_solver:10:order=2.5", "order must be an integer, got '2.5'"),
                           ("ddim:10:discrete=yes", "discrete must be true or false, got 'yes'")]:
        with pytest.raises(ValueError, match=message):
            samplers.parse_run(entry)
    config = tiny.get_config()
    config.compare.runs = ("dpm_solver_sde:10:eta=2", "ddim:10:eta=0.5")
    assert [run[2]["eta"] for run in validate_runs(config)] == [2.0, 0.5]
    config.compare.runs = ("ddim:10:eta=2",)
    with pytest.raises(ValueError, match=r"compare\.runs: eta must lie in \[0, 1\], got 2\.0"):
        validate_runs(config)


@pytest.mark.parametrize("module", CONFIGS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_shipped_configs_pass_the_checks_of_their_modes(module, monkeypatch):
    monkeypatch.chdir(ROOT)  # paths in configs (release weights) are relative to the repository
    for mode in ("train", "sample", "eval"):
        importlib.import_module(MODES[mode]).check(module.get_config())


@pytest.mark.parametrize("module, weights", [(mnist_vp_release, "release/mnist_vp_release.safetensors"),
                                             (mnist_vp_release_lw, "release/mnist_vp_release_lw.safetensors")])
def test_released_weights_load_with_their_config(module, weights):
    """The shipped weights match their config and predict the noise at t = T.

    At T, x = alpha_T x0 + sigma_T z with alpha_T ~ 0.0066 and sigma_T ~ 1, so the exact
    eps = (x - alpha_T E[x0 | x]) / sigma_T differs from x by at most about alpha_T |x0| / |x|
    <= alpha_T (pixels in [-1, 1], |x| ~ sqrt(D)); a network trained for this SDE is within a
    few alpha_T of it, one trained for another SDE or data scale,
    or untrained (output ~ 0: error ~ 1), is not.
    """
    import torch

    from sde.inference import load_ema_model
    from sde.sdes import create_sde

    config = module.get_config()
    model, _, step = load_ema_model(config, "", torch.device("cpu"), str(ROOT / weights))
    assert step == config.training.n_iters
    sde = create_sde(config)
    t = torch.full((8,), sde.T)
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    relative_error = ((model(x, t) - x).norm() / x.norm()).item()
    alpha_T = sde.alpha(torch.tensor(sde.T, dtype=torch.float64)).item()
    assert relative_error < 5 * alpha_T, (relative_error, alpha_T)


def test_each_sampler_is_described_from_its_spec():
    for name in samplers.available():
        spec = samplers.SAMPLERS[name]
        text = samplers.describe(name)
        assert text.startswith(f"{name}: {spec.reference}") and f"default schedule {spec.schedule}" in text
        for key, option in spec.all_options.items():
            assert f"  {key} (" in text and option.help in text
