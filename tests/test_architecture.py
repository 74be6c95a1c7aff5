"""The layer rule, enforced from the import graph: each diffopt module imports only from its own
layer or the layers below it (ARCHITECTURE.md draws them).

Every module under ``diffopt/`` is parsed with ``ast``; every import counts, including those
inside functions (a lazy upward import still makes the lower layer depend on the higher one)
and ``importlib.import_module("diffopt....")`` with a literal name. The only exceptions are the
compatibility shims listed in :data:`ALLOWED`, each with its reason. A runtime check confirms
that importing the optimizers loads nothing above them.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "diffopt"

# Lowest first. A module belongs to the layer of its longest listed prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("diffopt._version", "diffopt._progress", "diffopt._measure", "diffopt._io", "diffopt.errors")),
    ("optim", ("diffopt.optim",)),
    ("unroll", ("diffopt.unroll", "diffopt.innerloop")),
    ("algorithms / tasks / ports", ("diffopt.algorithms", "diffopt.tasks", "diffopt.ports", "diffopt.hyper")),
    ("training / diagnostics / testing",
     ("diffopt.recipes", "diffopt.training", "diffopt.distributed", "diffopt.diagnostics", "diffopt.testing")),
    ("bench", ("diffopt.bench",)),
    ("cli", ("diffopt.cli",)),
    # Entry points: the package's own namespace and the ``python -m`` modules, which nothing in diffopt imports.
    ("entry points", ("diffopt", "diffopt.__main__")),
]

# (importing module, imported module) -> why the upward import is allowed.
ALLOWED: dict[tuple[str, str], str] = {
    ("diffopt.optim.learned", "diffopt.training.learned_optimizers"):
        "compatibility re-export: diffopt.optim.learned.OptimizerTrainer & co. resolve lazily through the "
        "module's __getattr__, on first access only, never when diffopt.optim is imported",
    ("diffopt.optim.learned", "diffopt.training.families"):
        "compatibility re-export: diffopt.optim.learned.family / FAMILIES & co. resolve lazily (as above)",
    ("diffopt.optim.learned.train", "diffopt.training.learned_optimizers"):
        "compatibility shim for the old module path diffopt.optim.learned.train, loaded only when imported by it",
    ("diffopt.optim.learned.families", "diffopt.training.families"):
        "compatibility shim for the old module path diffopt.optim.learned.families, loaded only when imported by it",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[int, str]:
    if module.split(".")[-1] == "__main__":  # ``python -m diffopt.X`` entry points
        return len(LAYERS) - 1, LAYERS[-1][0]
    best: tuple[int, int, str] | None = None
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # The entry-point layer is the package namespace itself, not a prefix: a new
            # subpackage must be given its layer, not fall into the top one.
            exact = index == len(LAYERS) - 1
            if module == prefix or (not exact and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), index, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py "
                             "(and to ARCHITECTURE.md)")
    return best[1], best[2]


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[importer].name == "__init__.py"
    parts = importer.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _closest_module(name: str) -> str | None:
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imported_modules(importer: str) -> set[tuple[str, int]]:
    """The diffopt modules ``importer`` imports anywhere in its body, with the line of each import."""
    tree = ast.parse(MODULES[importer].read_text(), filename=str(MODULES[importer]))
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(importer, node)
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                     for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
        for name in names:
            if name == "diffopt" or name.startswith("diffopt."):
                target = _closest_module(name)
                if target is not None:
                    found.add((target, node.lineno))
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_down_the_layers():
    violations = []
    for importer in MODULES:
        low, low_name = layer_of(importer)
        for imported, line in sorted(imported_modules(importer)):
            high, high_name = layer_of(imported)
            if high > low and (importer, imported) not in ALLOWED:
                violations.append(f"{importer} (layer {low_name}) imports {imported} (layer {high_name}) "
                                  f"at {MODULES[importer].relative_to(ROOT)}:{line}")
    assert not violations, "imports that point up the layers:\n" + "\n".join(violations)


def test_allowed_exceptions_are_still_needed():
    """An exception that no longer matches an import is stale: remove it."""
    present = {(importer, imported) for importer in MODULES for imported, _ in imported_modules(importer)}
    lazy = {("diffopt.optim.learned", target) for target in ("diffopt.training.learned_optimizers",
                                                             "diffopt.training.families")}
    stale = [pair for pair in ALLOWED if pair not in present and pair not in lazy]
    assert not stale, f"stale exceptions in ALLOWED: {stale}"
    source = MODULES["diffopt.optim.learned"].read_text()
    for _, target in lazy:  # the lazy re-export names its targets as strings for importlib
        assert f'"{target}"' in source


def test_a_new_subpackage_is_in_no_layer_until_given_one():
    with pytest.raises(AssertionError, match="diffopt.newthing.x is in no layer"):
        layer_of("diffopt.newthing.x")
    assert layer_of("diffopt.ports.learn2learn")[1] == "algorithms / tasks / ports"


def test_the_checker_resolves_relative_and_lazy_imports():
    """Relative imports resolve to modules (``from .. import x`` to the module ``x``), and an import
    inside a function counts like one at the top."""
    diagnose = {m for m, _ in imported_modules("diffopt.cli.diagnose")}
    assert {"diffopt.training.experiment", "diffopt.diagnostics"} <= diagnose
    assert "diffopt._measure" in {m for m, _ in imported_modules("diffopt.bench")}  # from .. import _measure
    assert "diffopt.training.learned_optimizers" in {m for m, _ in imported_modules("diffopt.optim.learned.train")}
    assert "diffopt.cli.bench" in {m for m, _ in imported_modules("diffopt.bench.__main__")}  # inside main()
    assert layer_of("diffopt.bench.__main__")[1] == "entry points"
    assert layer_of("diffopt.optim.learned.lstm")[1] == "optim"


def _fresh_modules(code: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", f"import sys; {code}; print('\\n'.join(sys.modules))"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


@pytest.mark.parametrize("code", ["import diffopt.optim", "import diffopt.optim.learned",
                                  "from diffopt.optim.learned import MLPOptimizer, load, save"])
def test_importing_the_optimizers_loads_nothing_above_them(code):
    loaded = _fresh_modules(code)
    above = sorted(m for m in loaded if m.startswith(("diffopt.training", "diffopt.unroll", "diffopt.tasks",
                                                      "diffopt.algorithms", "diffopt.diagnostics", "diffopt.bench",
                                                      "diffopt.cli", "diffopt.recipes", "diffopt.testing")))
    assert not above, f"{code!r} loaded {above}"


def test_the_benchmarks_do_not_load_the_command_line():
    loaded = _fresh_modules("import diffopt.bench")
    assert not any(m.startswith("diffopt.cli") for m in loaded)


def test_moved_names_stay_importable_from_their_old_places():
    """Compatibility: what moved up to diffopt.training is the same object under its old names."""
    import diffopt.optim.learned as learned
    import diffopt.training as training
    from diffopt import unroll
    from diffopt.optim.learned import factory
    from diffopt.optim.learned.families import family as old_family
    from diffopt.optim.learned.train import OptimizerTrainer as OldTrainer
    from diffopt.training import families, learned_optimizers

    for name in ("OptimizerTrainer", "TrainConfig", "Unroll", "loss_curves", "OBJECTIVES"):
        assert getattr(learned, name) is getattr(learned_optimizers, name) is getattr(training, name)
    for name in ("FAMILIES", "FewShotFamily", "QuadraticFamily", "SinusoidFamily", "TaskBatch", "TaskFamily", "family"):
        assert getattr(learned, name) is getattr(families, name)
    assert learned.MODES == learned_optimizers.MODES and set(learned.MODES) <= set(unroll.MODES)
    assert OldTrainer is training.OptimizerTrainer and old_family is training.family
    assert learned.make_rule is factory.make_rule
    with pytest.raises(AttributeError, match="no attribute 'Nonexistent'"):
        learned.Nonexistent
