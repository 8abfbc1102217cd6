"""The rule for randomness on any device (sde/randomness.py): a draw happens on its generator's
device and moves to where it is used; RNG states are restored from the CPU whatever device a
checkpoint was mapped to. Both crashes a CUDA run met are caught here on a CPU."""
import ast
from pathlib import Path

import pytest
import torch

from sde import checkpoint, randomness

ROOT = Path(__file__).resolve().parents[1]
#: torch functions that draw random numbers and take a ``generator``.
DRAWS = {"rand", "randn", "randint", "randperm", "multinomial", "bernoulli", "normal", "poisson",
         "rand_like", "randn_like", "randint_like"}
#: Tensor methods that draw in place.
IN_PLACE_DRAWS = {"random_", "uniform_", "normal_", "bernoulli_", "exponential_", "geometric_",
                  "cauchy_", "log_normal_"}


def draws_bypassing_the_helper(paths, root: Path = ROOT) -> list[str]:
    """Every draw with a ``generator=`` argument outside sde/randomness.py."""
    found = []
    for path in paths:
        if path.name == "randomness.py" and path.parent.name == "sde":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            named = node.func.attr in IN_PLACE_DRAWS or (
                node.func.attr in DRAWS and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch")
            if named and any(keyword.arg == "generator" for keyword in node.keywords):
                found.append(f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr}")
    return found


def test_no_draw_with_a_generator_bypasses_the_helper():
    """A CPU generator filling a CUDA tensor is refused by PyTorch (the crash of --mode eval on
    CUDA): every draw with a generator goes through sde.randomness, which draws on the
    generator's device."""
    paths = [*(ROOT / "sde").rglob("*.py"), *(ROOT / "evaluation").rglob("*.py")]
    assert not draws_bypassing_the_helper(paths), draws_bypassing_the_helper(paths)


def test_the_scan_finds_a_draw_that_bypasses_the_helper(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("import torch\n"
                      "def f(x, g):\n"
                      "    a = torch.rand(3, generator=g, device=x.device)\n"
                      "    x.normal_(generator=g)\n"
                      "    return torch.rand(3)\n")
    found = draws_bypassing_the_helper([source], tmp_path)
    assert [line.split(" ")[-1] for line in found] == ["torch.rand", "torch.normal_"]


@pytest.mark.parametrize("draw", ["rand", "randn"])
def test_a_draw_happens_on_the_generators_device_and_moves(draw):
    """The values are the generator's own draws (the same as before the rule, on the CPU), and
    the result lands on the requested device, which may differ from the generator's."""
    expected = getattr(torch, draw)((2, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    drawn = getattr(randomness, draw)((2, 3), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(drawn, expected)
    elsewhere = getattr(randomness, draw)((2, 3), generator=torch.Generator().manual_seed(5), device="meta")
    assert elsewhere.device.type == "meta" and elsewhere.shape == (2, 3)
    generator = torch.Generator().manual_seed(5)
    assert torch.equal(randomness.randint(0, 7, (4,), generator=generator),
                       torch.randint(0, 7, (4,), generator=torch.Generator().manual_seed(5)))
    assert randomness.randperm(6, generator=generator, device="meta").device.type == "meta"


def test_rng_states_are_restored_from_the_cpu_whatever_the_map_location(tmp_path):
    """Resuming on CUDA mapped the saved RNG states to the GPU, where ``set_rng_state`` and
    ``Generator.set_state`` refuse them (a TypeError). ``map_location='meta'`` shows the same
    on a CPU: the checkpoint's tensors go there, its RNG states stay on the CPU and restore."""
    from sde.modes.train import rng_state, set_rng_state

    generator = torch.Generator().manual_seed(3)
    weights = {"weight": torch.ones(2)}
    state = {"model": weights, "ema": dict(weights), "rng": rng_state(generator), "step": 4}
    checkpoint.save_checkpoint(tmp_path, 4, state, keep=1)
    expected = torch.randn(3, generator=generator)
    _, loaded = checkpoint.load_latest(tmp_path, map_location="meta")
    assert loaded["model"]["weight"].device.type == "meta"
    assert loaded["rng"]["noise"].device.type == "cpu" and loaded["step"] == 4
    restored = torch.Generator()
    set_rng_state(loaded["rng"], restored)
    assert torch.equal(torch.randn(3, generator=restored), expected)


def test_a_state_on_the_meta_device_is_refused_with_one_line():
    with pytest.raises(ValueError, match="RNG state on the 'meta' device has no values"):
        randomness.set_state(torch.Generator().get_state().to("meta"), torch.Generator())
