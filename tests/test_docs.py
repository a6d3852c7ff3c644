"""The manual: the site builds strictly, every config field is described, the examples' headers are complete, and
the README stays a short entry point whose commands still run.

The schema's agreement with `tuneyard validate` is tests/test_schema.py's.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from tuneyard.cluster import config as cluster_config
from tuneyard.launch import config as launch_config
from tuneyard.launch.cli import _parser, main
from tuneyard.launch.config import JobConfig
from tuneyard.launch.schema import job_schema, reference_markdown
from tuneyard.rlhf import config as rlhf_config
from tuneyard.training import config as training_config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
PIPELINES = sorted((ROOT / "examples" / "pipelines").glob("*.yaml"))


def _hooks():
    """docs/hooks.py, the MkDocs hooks that generate pages (a file of the docs, not a package module)."""
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the site ------------------------------------------------------------------------------------------------------


def test_site_builds_strictly(tmp_path):
    """`make docs`'s build: a broken link or anchor, or a page missing from the nav, would fail it."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (make install installs it)")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("reference", "examples", "contributing", "online-rl", "benchmarks", "extending", "troubleshooting"):
        assert (site / page / "index.html").is_file(), page
    assert (site / "tuneyard.schema.json").is_file()
    assert (site / "search" / "search_index.json").is_file()


def test_every_page_is_in_the_nav():
    """A page left out of the nav is not reachable; the strict build refuses it too, this says which."""
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in DOCS.glob("*.md"):
        assert f": {page.name}" in nav, f"docs/{page.name} is not in mkdocs.yml's nav"


# --- every field described -----------------------------------------------------------------------------------------

CONFIG_MODULES = (training_config, rlhf_config, cluster_config, launch_config)


def _config_models() -> list[type[BaseModel]]:
    """Every pydantic model the config modules define."""
    return [
        model
        for module in CONFIG_MODULES
        for _, model in inspect.getmembers(module, inspect.isclass)
        if issubclass(model, BaseModel) and model is not BaseModel and model.__module__ == module.__name__
    ]


def test_every_config_field_has_a_description():
    missing = [
        f"{model.__module__}.{model.__name__}.{name}"
        for model in _config_models()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert not missing, "fields without description= (the reference and the editors show it):\n" + "\n".join(missing)


def test_config_models_are_all_reached_from_the_job():
    """The job's tree holds every config model (but the worker's TrainSpec and the job's own bases), so the
    reference and the schema cover them all."""
    reached = set(job_schema()["$defs"])
    for model in _config_models():
        if model.__name__ not in ("TrainSpec", "StageSections", "JobConfig"):
            assert model.__name__ in reached, model.__name__


def test_reference_has_an_anchor_for_every_key():
    reference = reference_markdown()
    for path in (
        "stage",
        "model.name_or_path",
        "data.train",
        "data.train-entry.path",
        "ppo.kl.in",
        "ppo.roles.rollout",
        "ppo.roles.rollout.kv_cache_gb",
        "reward.functions-entry.name",
        "cluster.gpu_memory",
    ):
        assert f"{{#{path}}}" in reference, path
    for name, field in JobConfig.model_fields.items():
        assert f"`{name}`" in reference and (field.description or "") in reference


# --- the examples' headers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", CONFIGS + PIPELINES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_header_says_what_it_shows_and_prints(example):
    header = _hooks().example_header(example)
    assert len(header["about"]) > 40, f"{example.name}: describe what it shows in its header"
    assert header.get("Prints"), f"{example.name}: say what it prints (# Prints: ...)"
    run = header.get("Run", "")
    assert run.startswith("tuneyard "), f"{example.name}: say how to run it (# Run: tuneyard ...)"
    command = shlex.split(run.partition(" (")[0])
    _parser().parse_args(command[1:])
    named = [Path(arg) for arg in command if arg.endswith(".yaml")]
    assert named and all((ROOT / path).is_file() for path in named), run
    if example.parent.name == "configs":
        mentioned = example.name in run or any(example.name in (ROOT / p).read_text() for p in named)
        assert mentioned, f"{example.name}: its Run line should run it (directly or through a pipeline)"
        assert header.get("schema") == "../../launch/tuneyard.schema.json"
    else:
        assert "schema" not in header


def test_example_index_lists_every_example():
    index = _hooks().examples_markdown()
    for example in CONFIGS + PIPELINES:
        assert f"### `{example.name}`" in index
        assert _hooks().example_header(example)["Prints"] in index


# --- the README: a short entry point whose commands run -----------------------------------------------------------


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[list[str]]:
    """The `tuneyard ...` and `make ...` command lines of a page's bash blocks (comments and redirects cut)."""
    found = []
    for block in _code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" > ")[0].strip()
            if line.startswith(("tuneyard ", "make ")):
                found.append(shlex.split(line, comments=True))
    return found


def test_readme_is_short_and_keeps_the_two_commands_and_the_demo_output():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert "make demo" in text and "make test" in text
    for line in ("[pretrain] run: runs/pretrain-tiny", "[sft] run: runs/sft-tiny", "task acc.", "eval loss"):
        assert line in text


def test_readme_links_exist():
    text = README.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_documented_commands_parse(page):
    """Every `tuneyard` line of the page's bash blocks is a command the CLI takes, naming files that exist; every
    `make` target exists."""
    makefile = (ROOT / "Makefile").read_text()
    parser = _parser()
    for command in _commands(page.read_text()):
        if command[0] == "make":
            for target in command[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"make {target}"
            continue
        args = command[1:]
        if args and "|" in args[0]:  # `tuneyard status|logs|stop JOB_ID`: three commands in one line
            args = [args[0].split("|")[0], *args[1:]]
        try:
            parser.parse_known_args(args)
        except SystemExit:
            pytest.fail(f"{page.name}: `{shlex.join(command)}` is not a command tuneyard takes")
        for arg in args:
            if arg.startswith("examples/") and not any(ch in arg for ch in "*?"):
                assert (ROOT / arg).exists(), f"{page.name}: {arg}"


def test_readme_validate_commands_run(capsys, monkeypatch):
    """The README's `tuneyard validate` lines and the jobs its tour names validate, as a user would run them."""
    monkeypatch.chdir(ROOT)
    commands = _commands(README.read_text())
    jobs = {arg for command in commands for arg in command if arg.startswith("examples/configs/")}
    assert jobs
    for job in sorted(jobs):
        assert main(["validate", job]) == 0, capsys.readouterr().err
    schema = [c for c in commands if c[:2] == ["tuneyard", "schema"]]
    assert schema and main(["schema"]) == 0


def test_cli_help_lists_schema():
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "schema" in sub.choices


# --- text moved out of the README stays in the manual -----------------------------------------------------------


def test_online_rl_page_keeps_the_ppo_bullets():
    page = (DOCS / "online-rl.md").read_text()
    for head in (
        "**One distribution.**",
        "**One stop set.**",
        "**DAPO's controls.**",
        "**Reward functions** run on",
        "**Advantage estimators.**",
        "**Rollouts from vLLM engines.**",
        "**Checkpoints and resume.**",
    ):
        assert head in page, head
