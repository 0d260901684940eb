"""The environment `make setup` builds is the pinned one."""

from importlib.metadata import version
from pathlib import Path


def _pins():
    pins = {}
    for line in Path("constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, v = line.split("==")
            pins[name.lower().replace("_", "-")] = v
    return pins


def test_core_dependencies_match_constraints():
    pins = _pins()
    for name in ("torch", "deepspeed", "tensorboard", "rich", "numpy", "pyyaml", "pillow", "scikit-learn"):
        installed = version(name).split("+")[0]
        assert installed == pins[name], f"{name}: installed {installed}, pinned {pins[name]}"
    assert version("torch").startswith("2.13.0")


def test_deepspeed_imports_on_cpu():
    import deepspeed  # noqa: F401


def test_every_declared_dependency_is_imported_by_the_package():
    """A dependency earns its place by being used: each one in pyproject's list is imported
    somewhere in revcol_dist/ or launchers/ (fairscale and apex were dropped: README)."""
    import re
    import tomllib

    deps = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    modules = {"pyyaml": "yaml", "pillow": "PIL", "scikit-learn": "sklearn",
               "tensorboard": r"torch\.utils\.tensorboard"}  # torch's writer needs the tensorboard package
    source = "\n".join(p.read_text() for d in ("revcol_dist", "launchers") for p in Path(d).rglob("*.py"))
    for dep in deps:
        name = re.split(r"[<>=\[ ]", dep)[0].lower()
        module = modules.get(name, name)
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{name} is declared but never imported"
    assert "fairscale" not in Path("pyproject.toml").read_text() and "apex" not in source
