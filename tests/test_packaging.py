"""tuneyard installs under one import name: `tuneyard.cluster`, `.training`, `.rlhf`, `.launch`, never as generic
top-level packages that another project's `training` or `cluster` would collide with."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.conftest import ROOT

PACKAGES = ("cluster", "training", "rlhf", "launch")


def test_the_folders_import_as_tuneyard_subpackages_and_not_by_their_own_names(tmp_path):
    (tmp_path / "training").mkdir()  # a user's own package of the same name, in the directory they run from
    (tmp_path / "training" / "__init__.py").write_text("MINE = True\n")
    probe = (
        "import importlib.util, training, tuneyard.training.stages, tuneyard.launch.cli, tuneyard.rlhf.ppo.controller;"
        "assert training.MINE;"
        "assert importlib.util.find_spec('launch') is None and importlib.util.find_spec('rlhf') is None;"
        "print(tuneyard.training.stages.__file__)"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(ROOT / "training" / "stages.py")


def test_every_package_folder_is_listed_for_the_wheel_under_its_tuneyard_name():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == {f"tuneyard.{name}": name for name in PACKAGES}
    folders = {
        "tuneyard." + str(init.parent.relative_to(ROOT)).replace("/", ".")
        for name in PACKAGES
        for init in (ROOT / name).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == folders


LAYERS = ("cluster", "training", "rlhf", "launch")  # each imports only from itself and the layers before it


def imported_modules(path, modules: set[str]) -> set[str]:
    """The tuneyard modules a source file imports, at any depth of the file: `from a.b import c` imports the
    module a.b.c when there is one, else a.b."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tuneyard."):
            names |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
            }
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("tuneyard.")}
    return names & modules


def test_imports_point_down_the_layers_and_form_no_circle():
    modules = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(("tuneyard", *parts)).removesuffix(".__init__")] = path
    graph = {name: imported_modules(path, set(modules)) - {name} for name, path in modules.items()}
    upward = [
        f"{name} -> {target}"
        for name, targets in graph.items()
        for target in targets
        if LAYERS.index(target.split(".")[1]) > LAYERS.index(name.split(".")[1])
    ]
    assert not upward, upward
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "import circle: " + " -> ".join((*path[path.index(name) :], name))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(modules):
        visit(name, ())


def test_the_wheel_carries_the_job_schema(tmp_path):
    """The schema the examples name for editor completion ships in the package (package-data), current."""
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    for name in PACKAGES:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    proc = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("tuneyard-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("tuneyard/launch/tuneyard.schema.json").decode()
    assert shipped == (ROOT / "launch" / "tuneyard.schema.json").read_text()
