"""The sbatch script and command that `tuneyard submit --slurm` builds: quoting, required values, CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import SFT_JOB, job_dict
from tuneyard.cluster import ray_jobs
from tuneyard.cluster.ray_cluster import ClusterError
from tuneyard.cluster.slurm import (
    BLOCK_END,
    BLOCK_START,
    TEMPLATE,
    VARIABLES,
    SlurmRequest,
    output_pattern,
    render_script,
)

BIN = Path(sys.executable).parent

HOSTILE = [
    "$(touch pwned-dollar)",
    "`touch pwned-tick`",
    "'; touch pwned-quote; '",
    '"; touch pwned-dquote; "',
    "a\ntouch pwned-newline\n",
    "x; touch pwned-semi & touch pwned-amp | cat",
    "\\$(touch pwned-backslash)\\",
    "${IFS}touch${IFS}pwned-ifs",
    "-n",
    "",
    " spaced  out ",
    "ünïcødé ✓",
]


def _variables(**changes) -> dict:
    values = {name: "" for name in VARIABLES}
    values.update(
        TUNEYARD_JOB="/jobs/job.yaml",
        TUNEYARD_OVERRIDES=[],
        TUNEYARD_PYTHON="/venv/bin/python3",
        TUNEYARD_WORKDIR="/work",
    )
    values.update(changes)
    return values


def _block(script: str) -> str:
    return script[script.index(BLOCK_START) : script.index(BLOCK_END)]


def test_hostile_values_come_through_as_data(tmp_path):
    """Every value reaches bash verbatim, and none of the commands hidden in them runs."""
    scalars = {name: HOSTILE[i % len(HOSTILE)] for i, name in enumerate(VARIABLES) if name != "TUNEYARD_OVERRIDES"}
    scalars["TUNEYARD_JOB"] = "/jobs/$(touch pwned-job)/`id`;job 'x'.yaml"  # required: non-empty
    scalars["TUNEYARD_PYTHON"] = "/venv/bin/python3 $(touch pwned-python)"
    scalars["TUNEYARD_WORKDIR"] = '/work dir/"$HOME"'
    script = render_script(_variables(**scalars, TUNEYARD_OVERRIDES=HOSTILE))
    names = [n for n in VARIABLES if n != "TUNEYARD_OVERRIDES"]
    show = "".join(f'printf "%s\\0" "${n}"\n' for n in names) + 'printf "%s\\0" "${TUNEYARD_OVERRIDES[@]}"\n'
    proc = subprocess.run(
        ["bash", "-c", _block(script) + "\n" + show], cwd=tmp_path, capture_output=True, timeout=30, env={}
    )
    assert proc.returncode == 0, proc.stderr
    values = proc.stdout.decode().split("\0")[:-1]
    assert values[: len(names)] == [scalars[n] for n in names]
    assert values[len(names) :] == HOSTILE
    assert not list(tmp_path.iterdir())  # no pwned-* file: nothing was executed


def test_rendered_script_is_valid_bash_and_keeps_the_template():
    script = render_script(_variables(TUNEYARD_OVERRIDES=["training.max_steps=5"]))
    assert subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True).returncode == 0
    assert script.startswith("#!/bin/bash") and "#SBATCH --signal=B:USR1@120" in script
    assert "TUNEYARD_OVERRIDES=(training.max_steps=5)" in script
    template = TEMPLATE.read_text()
    assert script.split(BLOCK_END, 1)[1] == template.split(BLOCK_END, 1)[1]  # only the block changed


@pytest.mark.parametrize("missing", ["TUNEYARD_JOB", "TUNEYARD_PYTHON", "TUNEYARD_WORKDIR"])
def test_a_missing_required_value_is_a_clear_error(missing):
    with pytest.raises(ClusterError, match=f"needs a value for {missing}"):
        render_script(_variables(**{missing: ""}))


def test_unknown_variable_and_nul_are_refused():
    with pytest.raises(ClusterError, match="unknown sbatch template variable"):
        render_script(_variables(TUNEYARD_JBO="x"))
    with pytest.raises(ClusterError, match="TUNEYARD_OVERRIDES holds a NUL"):
        render_script(_variables(TUNEYARD_OVERRIDES=["a\0b"]))


def test_sbatch_options_are_single_argv_elements():
    hostile = "$(touch pwned) ; `id` 'q'"
    request = SlurmRequest(
        job="/j.yaml",
        nodes=2,
        job_name=hostile,
        partition="gpu",
        time="1:00:00",
        account=hostile,
        gpus_per_node=4,
        requeue=True,
        preempt_warning_s=300,
        workdir="/w",
        sbatch_args=["--qos=high"],
    )
    command = request.sbatch_command()
    assert command[:2] == ["sbatch", "--parsable"]
    for option in (
        "--nodes=2",
        f"--job-name={hostile}",
        f"--account={hostile}",
        "--partition=gpu",
        "--time=1:00:00",
        "--gpus-per-node=4",
        "--requeue",
        "--signal=B:USR1@300",
        "--chdir=/w",
        "--output=/w/slurm-%j.out",
        "--qos=high",
    ):
        assert option in command
    assert request.variables()["TUNEYARD_REQUEUE"] == "1" and request.variables()["TUNEYARD_GPUS_PER_NODE"] == "4"
    with pytest.raises(ClusterError, match="--nodes 0"):
        SlurmRequest(job="/j.yaml", nodes=0).sbatch_command()


@pytest.mark.parametrize(
    "value", ["90", "0", "30:00", "4:00:00", "2-12", "2-12:30", "2-12:30:15", "UNLIMITED", "infinite", "100000"]
)
def test_time_limits_sbatch_accepts_pass(value):
    assert f"--time={value}" in SlurmRequest(job="/j.yaml", nodes=1, time=value).sbatch_command()


@pytest.mark.parametrize(
    "value", ["forever", "", "4h", "1:2:3:4", "2-", "-12", "2-12:30:15:1", "1.5", " 90", "90 ", "4:00:00; id", "2d"]
)
def test_time_limits_sbatch_does_not_take_are_refused(value):
    with pytest.raises(ClusterError) as info:
        SlurmRequest(job="/j.yaml", nodes=1, time=value).sbatch_command()
    message = str(info.value)
    assert message.startswith(f"--time {value!r} is not a time limit sbatch accepts; give minutes, ")
    assert "days-hours:minutes:seconds" in message and "UNLIMITED" in message and "\n" not in message


def test_output_goes_to_the_run_dirs_logs_with_its_percent_signs_kept():
    assert output_pattern("/runs/a/logs") == "/runs/a/logs/slurm-%j.out"
    assert output_pattern("/runs/100%j done/logs") == "/runs/100%%j done/logs/slurm-%j.out"
    with pytest.raises(ClusterError, match="holds a backslash"):
        output_pattern("/runs/a\\b/logs")


def test_template_run_by_hand_without_a_job_says_what_to_set(tmp_path):
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": "7"}
    proc = subprocess.run(["bash", str(TEMPLATE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "TUNEYARD_JOB is not set" in proc.stderr
    outside = subprocess.run(["bash", str(TEMPLATE)], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert outside.returncode == 1 and "not inside a SLURM job" in outside.stderr


def _cli(tmp_path: Path, monkeypatch, capsys, *args: str, job: dict | None = None) -> tuple[int, str, str]:
    """`tuneyard submit JOB ARGS` in this process (the CLI's main), with no sbatch on PATH."""
    from tuneyard.launch.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job or job_dict(SFT_JOB, tmp_path / "run")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(BIN))  # a dry run and the input checks must not need sbatch
    capsys.readouterr()
    code = main(["submit", str(path), *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_the_command_and_script_and_submits_nothing(tmp_path, monkeypatch, capsys):
    args = ("training.max_steps=3", "--slurm", "--nodes", "2", "--job-name", "a b", "--dry-run")
    code, out, err = _cli(tmp_path, monkeypatch, capsys, *args)
    assert code == 0, err
    first, script = out.split("\n", 1)
    assert first.startswith("# sbatch --parsable --nodes=2 '--job-name=a b'")
    assert f"TUNEYARD_JOB={tmp_path / 'job.yaml'}" in script and "TUNEYARD_OVERRIDES=(training.max_steps=3)" in script
    assert f"TUNEYARD_PYTHON={sys.executable}" in script
    assert f" --output={tmp_path / 'run' / 'logs' / 'slurm-%j.out'} " in first  # not in the calling folder
    assert not (tmp_path / "run").exists()


def test_ray_dry_run_shows_the_job_the_cluster_gets(tmp_path, monkeypatch, capsys):
    code, out, err = _cli(tmp_path, monkeypatch, capsys, "--ray", "127.0.0.1:1", "--dry-run")
    assert code == 0, err
    assert "# entrypoint: tuneyard train job.yaml" in out
    assert yaml.safe_load(out)["cluster"]["address"] == "auto"


@pytest.mark.parametrize(
    ("args", "job_changes", "message"),
    [
        (["--slurm"], {}, "--slurm needs --nodes N"),
        (["--slurm", "--nodes", "2", "--preempt-warning", "0"], {}, "--preempt-warning 0"),
        (["--slurm", "--nodes", "2", "--time", "forever", "--dry-run"], {}, "--time 'forever' is not a time limit"),
        (
            ["--slurm", "--nodes", "2"],
            {"cluster": {"workers": 3, "placement": "strict_spread"}},
            "cluster.workers=3 with cluster.placement=strict_spread needs one node per worker",
        ),
        (["--slurm", "--nodes", "2"], {"training": {"lerning_rate": 1}}, "unknown key 'training.lerning_rate'"),
        (["--ray", "ray://head:10001"], {}, "not a 'ray://' address"),
        (["--ray", "http://head"], {}, "give host and port"),
        (["--slurm", "--nodes", "2"], {}, "sbatch is not installed here"),
    ],
)
def test_bad_submissions_are_one_paragraph_and_exit_2(tmp_path, monkeypatch, capsys, args, job_changes, message):
    job = job_dict(SFT_JOB, tmp_path / "run", **job_changes)
    code, out, err = _cli(tmp_path, monkeypatch, capsys, *args, job=job)
    assert code == 2, out + err
    assert message in err and "Traceback" not in err, err


def test_jobs_url_forms():
    assert ray_jobs.jobs_url("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert ray_jobs.jobs_url("https://head:443/") == "https://head:443"
    with pytest.raises(ClusterError, match="no Ray address"):
        ray_jobs.jobs_url("")


def test_auth_token_comes_from_where_ray_looks(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_jobs.find_auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_jobs.find_auth_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert ray_jobs.find_auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_jobs.find_auth_token() == "from-env"
    with pytest.raises(ClusterError, match="must not go into a job's runtime_env"):
        ray_jobs.submit("127.0.0.1:1", "true", tmp_path, "x", env_vars={"RAY_AUTH_TOKEN": "t"})
