"""cdiff's imports flow one way: read from the source with ast (nothing is imported), the import
graph of cdiff/ has no circle, and no module imports one from a higher layer."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layers from the bottom up: a module may import from its own layer and the ones below it.
# Every module of cdiff/ is in exactly one layer (a new module is placed here when it lands).
LAYERS = {
    "base": {
        "cdiff.flags", "cdiff.files", "cdiff.progress", "cdiff.config", "cdiff.graphs", "cdiff.metrics",
        "cdiff.confidence_map", "cdiff.imagefiles", "cdiff.torchrun", "cdiff.devices", "cdiff.signals", "cdiff.download",
        "cdiff.hub", "cdiff.zoo", "cdiff.protocol", "cdiff.published",
    },
    "model": {
        "cdiff.layers", "cdiff.attention", "cdiff.unet", "cdiff.vae", "cdiff.loss", "cdiff.schedulers",
        "cdiff.samplers", "cdiff.stepcache", "cdiff.tiling", "cdiff.pipeline",
    },
    "weights": {
        "cdiff.weightfile", "cdiff.statedict", "cdiff.layouts", "cdiff.layouts.diffusers",
        "cdiff.layouts.diffusers_config", "cdiff.layouts.original", "cdiff.layouts.detect", "cdiff.infer_config",
        "cdiff.native", "cdiff.load", "cdiff.surgery", "cdiff.prompt", "cdiff.perceptual", "cdiff.export", "cdiff.testing",
        "cdiff.networks",
    },
    "data": {
        "cdiff.data", "cdiff.data.imageio", "cdiff.data.split", "cdiff.data.transforms", "cdiff.data.datasets",
        "cdiff.data.synth", "cdiff.geo", "cdiff.data.frozen", "cdiff.data.spacenet6_chips", "cdiff.matching",
    },
    "npde": {
        "cdiff.npde", "cdiff.npde.config", "cdiff.npde.pde", "cdiff.npde.model", "cdiff.npde.vgg",
        "cdiff.npde.losses", "cdiff.npde.training", "cdiff.npde.files", "cdiff.npde.inference",
    },
    "commands": {
        "cdiff.convert", "cdiff.evaluate", "cdiff.scoring", "cdiff.report", "cdiff.fetch", "cdiff.translators", "cdiff.translate", "cdiff.demo",
        "cdiff.train", "cdiff.train.task", "cdiff.train.config", "cdiff.train.seeds", "cdiff.train.ema",
        "cdiff.train.distributed", "cdiff.train.rundir", "cdiff.train.logs", "cdiff.train.validation",
        "cdiff.train.data", "cdiff.train.optim", "cdiff.train.start", "cdiff.train.latents", "cdiff.train.cdiffset",
        "cdiff.train.s2o_npde", "cdiff.train.distill", "cdiff.train.kinds", "cdiff.train.configfile", "cdiff.train.loop", "cdiff.train.run",
    },
    "cli": {"cdiff", "cdiff.cli", "cdiff.__main__"},
}
# Imports that are wrong whatever the layers say: (importer prefix, imported module).
FORBIDDEN = [
    ("cdiff.train", "cdiff.demo"),  # training never needs the demo
    ("cdiff.", "cdiff.cli"),  # the command line is the top; only cdiff.__main__ calls it
]


def module_files(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under cdiff/ (a package by its __init__.py)."""
    out = {}
    for path in sorted((root / "cdiff").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The cdiff modules ``name`` imports, at module level or inside functions. Importing a.b.c runs
    the package a.b's __init__ first, so each package on the way counts too (but not cdiff's own
    __init__, which every process has run before any submodule)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            parts = target.split(".")
            found.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    found.discard(name)
    return {m for m in found if not name.startswith(m + ".")}  # a package's submodules reach it anyway


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files(ROOT)
    return {name: imports(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle(graph):
    assert circles(graph) == []


def test_the_circle_finder_finds_circles():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_every_module_has_a_layer(graph):
    placed = [m for layer in LAYERS.values() for m in layer]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert sorted(set(graph) - set(placed)) == [], "place new modules in LAYERS"
    assert sorted(set(placed) - set(graph)) == [], "LAYERS names modules that no longer exist"


def test_no_module_imports_a_higher_layer(graph):
    rank = {m: i for i, layer in enumerate(LAYERS.values()) for m in layer}
    names = list(LAYERS)
    upward = [f"{m} ({names[rank[m]]}) imports {t} ({names[rank[t]]})"
              for m, targets in graph.items() for t in sorted(targets) if rank[t] > rank[m]]
    assert upward == []


def test_forbidden_imports(graph):
    bad = [f"{m} imports {t}" for m, targets in graph.items() for prefix, t in FORBIDDEN
           if m.startswith(prefix) and t in targets and m != "cdiff.__main__"]
    assert bad == []


def test_submodules_take_only_modules_and_the_version_from_the_package(graph):
    """``from cdiff import X`` in a submodule runs while cdiff/__init__.py is still importing: only
    submodules and ``__version__`` (set first) are sure to be there."""
    modules = module_files(ROOT)
    bad = []
    for name, path in modules.items():
        if name == "cdiff":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "cdiff" and not node.level:
                bad += [f"{name}: from cdiff import {a.name}" for a in node.names
                        if a.name != "__version__" and f"cdiff.{a.name}" not in modules and a.name != "kernels"]
            if isinstance(node, ast.Import) and any(a.name == "cdiff" for a in node.names) and name != "cdiff.cli":
                bad.append(f"{name}: import cdiff")
    assert bad == []
