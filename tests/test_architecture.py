"""The import rules of docs/architecture.md: each layer of the package imports only the layers above it."""

from __future__ import annotations

import ast
import pathlib

import pwsconv

ROOT = pathlib.Path(pwsconv.__file__).parent

#: top-level module or package → the pwsconv top-level names it may import (docs/architecture.md)
ALLOWED = {
    "functional": set(),
    "accel": {"functional"},
    "layers": {"functional"},
    "methods": {"layers", "accel", "functional"},
    "_bnlike": set(),
    "calibration": {"_bnlike", "layers", "accel", "functional"},
    "folding": {"methods", "layers", "accel", "functional"},
    "optim": set(),
    "convert": {"_bnlike", "calibration", "folding", "optim", "methods", "layers", "accel", "functional"},
    "data": set(),
    "models": {"methods", "convert", "folding", "optim", "layers", "accel", "functional"},
    "config": {"methods", "models", "data"},
    "train": {"config", "models", "data", "methods", "convert", "folding", "optim", "layers", "accel", "functional"},
    "diagnostics": {"convert", "folding", "optim", "train", "layers", "accel", "functional"},
}


def _relative(path: pathlib.Path, node: ast.ImportFrom) -> list[str]:
    """The dotted parts (relative to the package) that ``from <dots><module> import ...`` in ``path`` names."""
    pkg = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
    return base + (node.module.split(".") if node.module else [])


def _imports(path: pathlib.Path) -> set[str]:
    """The pwsconv top-level names a file imports (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = _relative(path, node)
            if parts:
                out.add(parts[0])
            else:   # ``from .. import x``: a submodule x, or a name of the package root
                out.update(a.name if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").exists() else "__init__"
                           for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pwsconv":
            parts = node.module.split(".")
            out.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pwsconv."))
    return out


def _files(top: str) -> list[pathlib.Path]:
    p = ROOT / top
    return sorted(p.rglob("*.py")) if p.is_dir() else [ROOT / f"{top}.py"]


def test_every_layer_imports_only_the_layers_above_it():
    bad = []
    for top, allowed in ALLOWED.items():
        files = _files(top)
        assert files and all(f.exists() for f in files), top
        for f in files:
            extra = _imports(f) - allowed - {top}
            if extra:
                bad.append(f"{f.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_nothing_imports_the_cli_and_the_engine_names_no_method():
    users = [f.relative_to(ROOT) for f in ROOT.rglob("*.py")
             if f.name != "__main__.py" and f.name != "cli.py" and "cli" in _imports(f)]
    assert users == []
    code = ast.unparse(ast.parse((ROOT / "train" / "engine.py").read_text()))   # without comments
    tree = ast.parse(code)
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and not (n.value.startswith("\n") or " " in n.value)}      # names, not docstrings or messages
    assert not strings & {"pws", "bn", "gn", "mabn", "sn", "wn", "ws", "sws"}
    assert "fuse_standardization" not in code and "layers" not in _imports(ROOT / "train" / "engine.py")
    assert "fuse_pws" not in code and "pws_recompute" not in code   # passed by the fields' declarations


def test_the_pws_layer_file_is_short_and_shows_eq_12():
    text = (ROOT / "layers" / "pws.py").read_text()
    assert len(text.splitlines()) <= 270
    assert "Ŵ_o = sqrt(2/n_l) · (W_o − E[W_o]) / sqrt(Var[W_o] + γ)" in text
    for acceleration in ("_accel_cache", "ContextVar", "saved_tensors_hooks", "register_forward_pre_hook"):
        assert acceleration not in text


def _module_imports(path: pathlib.Path) -> set[str]:
    """The pwsconv modules (dotted, relative to the package) a file imports, module level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = _relative(path, node)
            for a in node.names:   # ``from .x import y``: y may be a submodule of x
                sub = parts + [a.name]
                as_module = ROOT.joinpath(*sub).with_suffix(".py").exists() or ROOT.joinpath(*sub).is_dir()
                out.add(".".join(sub if as_module else parts))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pwsconv."):
            out.add(node.module.split(".", 1)[1])
    return {m for m in out if m}


def test_no_two_modules_import_each_other():
    """Modules (package ``__init__`` files aside, which gather their submodules) form no import cycle."""
    files = {".".join(f.relative_to(ROOT).with_suffix("").parts): f for f in ROOT.rglob("*.py")
             if f.name != "__init__.py"}
    graph = {m: {i for i in _module_imports(f) if i in files and i != m} for m, f in files.items()}
    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))
    assert cycles == []


def test_code_lives_in_src_or_benchmarks_and_results_in_results():
    repo = pathlib.Path(__file__).resolve().parents[1]
    code = sorted(str(p.relative_to(repo)) for p in (repo / "results").rglob("*") if p.suffix in (".py", ".sh"))
    assert code == []
    assert sorted(p.name for p in (repo / "benchmarks").iterdir() if p.name.startswith("results")) == []


def test_no_code_outside_the_registry_branches_on_a_method_name():
    """``method == "pws"`` and the like live only in ``methods/`` (and the paper's tables): the rest asks the method
    what it declares (``keeps_batchnorm``, ``fold_norm``, ``ln_io``, ``lazy``, ``spatial_stats``, options)."""
    names = set(pwsconv.available_methods())
    bad = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT)
        if rel.parts[0] == "methods" or rel.parts[:2] == ("experiments", "tables") or rel.as_posix() == \
                "experiments/table.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Compare) or "method" not in ast.unparse(node).lower():
                continue
            for side in (node.left, *node.comparators):
                elts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                hits = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in names]
                if hits:
                    bad.append(f"{rel}:{node.lineno} compares with {hits}")
    assert bad == []


def test_backward_is_called_only_by_the_one_training_step():
    calls = []
    for f in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward":
                calls.append(f"{f.relative_to(ROOT).as_posix()}:{node.lineno}")
    assert calls and {c.partition(":")[0] for c in calls} == {"train/step.py"}, calls


def test_one_training_loop():
    """The loop — epochs, LR schedule, metrics log, checkpoints — exists once, in the engine; detection and the probe
    are tasks of it (train/task.py), and every training step is ``train_step`` (the speed benchmark times it, the
    probe's measurement without update takes gradients with it)."""
    found: dict[str, set[str]] = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("MultiStepLR", "MetricsLog", "atomic_save", "train_step", "SGD"):
                    found.setdefault(name, set()).add(rel)
    assert found["MultiStepLR"] == found["MetricsLog"] == {"train/engine.py"}
    assert found["train_step"] == {"train/engine.py", "diagnostics/experiment.py", "experiments/speed.py"}
    assert "detection/train.py" not in found["atomic_save"] | found["SGD"]
    assert "diagnostics/experiment.py" not in found["SGD"]


def test_no_source_file_is_over_500_lines():
    long = {f.relative_to(ROOT).as_posix(): n for f in ROOT.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}
