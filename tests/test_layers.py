"""The layers of docs/design.md hold: no module imports one of a higher layer, no import
circle (counting imports inside functions), and no file uses another file's private names."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Layers from the bottom; a module may import modules of its own layer or below (within a
#: layer, the import graph must still be free of circles).
LAYERS = [
    ["evaluation", "sde.checks", "sde.config_rules", "sde.divergence", "sde.progress", "sde.randomness",
     "sde.environment", "sde.network", "sde.conditioning", "sde.sdes", "sde.checkpoint", "sde.distributed",
     "sde.data"],
    ["sde.workdir", "sde.images", "sde.models"],
    ["sde.samplers", "sde.losses"],
    ["sde.likelihood", "sde.latent", "sde.inverse"],
    ["sde.inference", "sde.configuration"],
    ["sde.generation"],
    ["sde.quality", "sde.toy_figures"],
    ["sde.api", "sde.modes", "configs"],
    ["sde", "main", "sde.testing"],  # sde.testing: what tests and benchmarks share, above all
]
#: Tools run as scripts, above everything they use.
SCRIPTS = {"evaluation.train_classifier"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    files = [*(ROOT / "sde").rglob("*.py"), *(ROOT / "evaluation").rglob("*.py"),
             *(ROOT / "configs").rglob("*.py"), *ROOT.glob("main.py")]
    return {module_name(path): path for path in files}


def layer_of(module: str) -> int:
    """The layer of the most specific prefix of ``module`` listed in ``LAYERS``."""
    best, level = -1, None
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, level = len(name), index
    if level is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: place it")
    return level


def imports(path: Path, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(imported project module, line, names taken from it) of every import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in known]
            found += [(sub, node.lineno, []) for sub in submodules]
            others = [name for name in names if f"{node.module}.{name}" not in known]
            if others or not submodules:  # ``from package import submodule`` is an edge to the submodule
                found.append((node.module, node.lineno, others))
    return [(module, line, names) for module, line, names in found
            if module.split(".")[0] in ("sde", "evaluation", "configs", "main")]


def test_every_import_goes_down_the_layers():
    modules = sources()
    upward = []
    for module, path in modules.items():
        if module in SCRIPTS:
            continue
        for imported, line, _ in imports(path, set(modules)):
            if imported == "sde" and module.startswith("sde."):
                continue  # ``from sde import x`` names a submodule, checked as one
            if layer_of(imported) > layer_of(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_no_import_circle():
    modules = sources()
    graph = {module: set() for module in modules}
    for module, path in modules.items():
        for imported, _, names in imports(path, set(modules)):
            targets = [imported] if imported in modules else []
            targets += [f"{imported}.{name}" for name in names if f"{imported}.{name}" in modules]
            graph[module] |= {t for t in targets if t != module and not module.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_private_name_is_used_across_files():
    """In the toolkit and in the benchmarks (which sit above it)."""
    modules = {**sources(), **{module_name(path): path for path in (ROOT / "bench").rglob("*.py")}}
    crossing = []
    for module, path in modules.items():
        for imported, line, names in imports(path, set(modules)):
            crossing += [f"{path.relative_to(ROOT)}:{line} imports {imported}.{name}"
                         for name in names if name.startswith("_")]
        tree = ast.parse(path.read_text())
        aliases = {alias.asname or alias.name for node in ast.walk(tree)
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names
                   if (getattr(node, "module", "") or alias.name).split(".")[0] in ("sde", "evaluation")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                crossing.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not crossing, "private names used across files:\n" + "\n".join(crossing)


def test_the_layer_checks_see_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    """The checks above can fail: a data module importing a mode is caught, and so is a
    circle made by an import inside a function."""
    package = tmp_path / "sde"
    (package / "data").mkdir(parents=True)
    (package / "modes").mkdir()
    (package / "data" / "x.py").write_text("def f():\n    from sde.modes import y\n")
    (package / "modes" / "y.py").write_text("from sde.data import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="imports up the layers"):
        test_every_import_goes_down_the_layers()
    with pytest.raises(pytest.fail.Exception, match="import circle"):
        test_no_import_circle()
