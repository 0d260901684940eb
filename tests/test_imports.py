"""The package's shape: imports flow one way and private names stay in their module.

Allowed direction between the sub-packages (a package may import those to its right):
launchers, cli > plan > engine > parallel > monitor, data > models > reversible > portable > files, config, randomness.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "revcol_dist"

# what each part may import from revcol_dist (besides itself)
ALLOWED = {
    "randomness": set(),
    "portable": {"files"},
    "reversible": {"randomness"},
    "models": {"reversible", "randomness"},
    "data": {"randomness"},
    "monitor": set(),
    "files": set(),
    "config": {"models"},  # validation builds the model config
    "parallel": {"models", "reversible", "files", "config", "monitor", "randomness", "portable"},
    "engine": {"models", "reversible", "files", "config", "monitor", "data", "parallel", "randomness", "portable"},
    "plan": {"models", "reversible", "files", "config", "monitor", "parallel", "engine", "randomness", "portable"},
    "cli": {"config", "data", "models", "engine", "parallel"},
}


def _part(module: str) -> str:
    """revcol_dist.models.revcol -> models; revcol_dist.config -> config."""
    return module.split(".")[1]


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield ".".join(parts), path, is_pkg


def _imports(module: str, path: Path, is_pkg: bool):
    """(imported revcol_dist module, names taken from it) for every import in the file."""
    package = module if is_pkg else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "revcol_dist":  # from .. import files: the module named
                for a in node.names:
                    yield f"revcol_dist.{a.name}", []
            elif target.startswith("revcol_dist"):
                yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("revcol_dist"):
                    yield a.name, []


MODULES = list(_modules())


def test_the_parts_are_all_known():
    assert {_part(m) for m, _, _ in MODULES if m != "revcol_dist"} <= set(ALLOWED) | {"__main__"}


@pytest.mark.parametrize("module,path,is_pkg", MODULES, ids=[m for m, _, _ in MODULES])
def test_imports_flow_one_way(module, path, is_pkg):
    if module == "revcol_dist":
        return
    mine = _part(module)
    for target, _ in _imports(module, path, is_pkg):
        if target == "revcol_dist":
            continue
        theirs = _part(target)
        assert theirs == mine or theirs in ALLOWED[mine], f"{module} imports {target}: {mine} may not import {theirs}"


@pytest.mark.parametrize("module,path,is_pkg", MODULES, ids=[m for m, _, _ in MODULES])
def test_no_private_name_crosses_a_module(module, path, is_pkg):
    for target, names in _imports(module, path, is_pkg):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{module} imports private {private} from {target}"


def test_models_know_nothing_of_parallelism_or_training():
    for module, path, is_pkg in MODULES:
        if module.startswith("revcol_dist.models"):
            for target, _ in _imports(module, path, is_pkg):
                assert _part(target) in ("models", "reversible", "randomness"), f"{module} imports {target}"
            assert "torch.distributed" not in path.read_text(), module
