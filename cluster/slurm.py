"""SLURM: render the sbatch template (`slurm/tuneyard.sbatch`), submit it, follow and stop the job.

Values reach the job two ways, neither through a shell: sbatch options are elements of sbatch's
argv, and the template's variables are assignments whose values are `shlex.quote`d. A value with
shell metacharacters is therefore data, never code.

`python -m tuneyard.cluster.slurm wait-nodes ADDRESS N SECONDS` is what the template runs to wait for
every node to join Ray.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tuneyard.cluster.ray_cluster import ClusterError

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "tuneyard.sbatch"
BLOCK_START = "# >>> tuneyard variables"
BLOCK_END = "# <<< tuneyard variables"
# the template's variables, in the order the block assigns them; TUNEYARD_OVERRIDES is a bash array
VARIABLES = (
    "TUNEYARD_JOB",
    "TUNEYARD_OVERRIDES",
    "TUNEYARD_PYTHON",
    "TUNEYARD_WORKDIR",
    "TUNEYARD_PORT_BASE",
    "TUNEYARD_RAY_WAIT",
    "TUNEYARD_RAY_TOKEN_FILE",
    "TUNEYARD_RAY_TMP",
    "TUNEYARD_REQUEUE",
    "TUNEYARD_GPUS_PER_NODE",
)
REQUIRED = ("TUNEYARD_JOB", "TUNEYARD_PYTHON", "TUNEYARD_WORKDIR")
SBATCH_TIMEOUT_S = 60
# the forms of sbatch's --time (man sbatch): minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds; SLURM reads any other text as no limit or refuses it late
TIME_LIMIT = re.compile(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|unlimited|infinite", re.IGNORECASE)
TIME_FORMS = (
    "minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes or days-hours:minutes:seconds "
    "(e.g. 90, 4:00:00, 2-12), or UNLIMITED"
)


@dataclass
class SlurmRequest:
    """What `tuneyard submit --slurm` asks of SLURM: the allocation and the template's variables."""

    job: str
    nodes: int
    overrides: list[str] = field(default_factory=list)
    python: str = sys.executable
    workdir: str = field(default_factory=lambda: str(Path.cwd()))
    job_name: str = "tuneyard"
    gpus_per_node: int = 0
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    requeue: bool = False
    preempt_warning_s: int = 120
    ray_wait_s: int = 300
    ray_token_file: str | None = None
    ray_tmp: str = "/tmp"
    port_base: int | None = None
    output: str | None = None
    sbatch_args: list[str] = field(default_factory=list)

    def variables(self) -> dict[str, str | list[str]]:
        """The template's variables for this request."""
        return {
            "TUNEYARD_JOB": self.job,
            "TUNEYARD_OVERRIDES": list(self.overrides),
            "TUNEYARD_PYTHON": self.python,
            "TUNEYARD_WORKDIR": self.workdir,
            "TUNEYARD_PORT_BASE": "" if self.port_base is None else str(self.port_base),
            "TUNEYARD_RAY_WAIT": str(self.ray_wait_s),
            "TUNEYARD_RAY_TOKEN_FILE": self.ray_token_file or "",
            "TUNEYARD_RAY_TMP": self.ray_tmp,
            "TUNEYARD_REQUEUE": "1" if self.requeue else "0",
            "TUNEYARD_GPUS_PER_NODE": str(self.gpus_per_node),
        }

    def sbatch_command(self) -> list[str]:
        """sbatch's argv: the allocation as options (no shell parses them), the script on stdin."""
        if self.nodes < 1:
            raise ClusterError(f"--nodes {self.nodes}: a job needs at least one node")
        if self.gpus_per_node < 0:
            raise ClusterError(f"--gpus-per-node {self.gpus_per_node}: give 0 or more")
        if self.preempt_warning_s < 1:
            raise ClusterError(f"--preempt-warning {self.preempt_warning_s}: give seconds, 1 or more")
        if self.time is not None and not TIME_LIMIT.fullmatch(self.time):
            raise ClusterError(f"--time {self.time!r} is not a time limit sbatch accepts; give {TIME_FORMS}")
        command = [
            "sbatch",
            "--parsable",
            f"--nodes={self.nodes}",
            f"--job-name={self.job_name}",
            f"--chdir={self.workdir}",
            f"--output={self.output or str(Path(self.workdir) / 'slurm-%j.out')}",
        ]
        # SLURM signals the batch shell (B:) this long before the time limit; the script passes it on
        command.append(f"--signal=B:USR1@{self.preempt_warning_s}")
        command.append("--requeue" if self.requeue else "--no-requeue")
        for flag, value in (("--partition", self.partition), ("--time", self.time), ("--account", self.account)):
            if value is not None:
                command.append(f"{flag}={value}")
        if self.gpus_per_node:
            command.append(f"--gpus-per-node={self.gpus_per_node}")
        return command + list(self.sbatch_args)


def _assignment(name: str, value: str | list[str]) -> str:
    if isinstance(value, list):
        return f"{name}=(" + " ".join(shlex.quote(v) for v in value) + ")"
    return f"{name}={shlex.quote(value)}"


def render_script(variables: dict[str, str | list[str]], template: str | None = None) -> str:
    """The template with its variables block replaced by quoted assignments of `variables`."""
    text = TEMPLATE.read_text() if template is None else template
    if BLOCK_START not in text or BLOCK_END not in text:
        raise ClusterError(f"the sbatch template has no '{BLOCK_START}' ... '{BLOCK_END}' block to fill in")
    unknown = sorted(set(variables) - set(VARIABLES))
    if unknown:
        raise ClusterError(f"unknown sbatch template variable(s) {', '.join(unknown)}; known: {', '.join(VARIABLES)}")
    missing = [name for name in REQUIRED if not variables.get(name)]
    if missing:
        raise ClusterError(
            f"the sbatch template needs a value for {', '.join(missing)} (see the variables at the top of {TEMPLATE})"
        )
    for name, value in variables.items():
        for item in value if isinstance(value, list) else [value]:
            if "\0" in item:
                raise ClusterError(f"{name} holds a NUL character, which no shell variable can carry; remove it")
    head, rest = text.split(BLOCK_START, 1)
    _, tail = rest.split(BLOCK_END, 1)
    lines = [BLOCK_START + " (rendered by `tuneyard submit`)"]
    lines += [_assignment(name, variables.get(name, [] if name == "TUNEYARD_OVERRIDES" else "")) for name in VARIABLES]
    return head + "\n".join(lines) + "\n" + BLOCK_END + tail


def _sbatch_refusal(stderr: str, request: SlurmRequest) -> str:
    """sbatch's own words, plus what to change when we recognise them."""
    reason = " ".join(line.removeprefix("sbatch: error: ").strip() for line in stderr.strip().splitlines())
    hint = ""
    if "node count specification invalid" in reason.lower() or "requested node configuration" in reason.lower():
        hint = " " + _too_many_nodes(request)
    elif "configuration source" in reason.lower():
        hint = " No SLURM configuration here: set SLURM_CONF (slurm/local-cluster.sh up prints it) or use a login node."
    return f"sbatch refused the job: {reason or 'no reason given'}.{hint}"


def _too_many_nodes(request: SlurmRequest) -> str:
    name, count = partition_size(request.partition)
    has = f" has ({count})" if count is not None else " has"
    return (
        f"--nodes {request.nodes} asks for more nodes than partition '{name}'{has}; "
        "ask for fewer nodes or another --partition."
    )


def partition_size(partition: str | None) -> tuple[str, int | None]:
    """A partition's name (the default one's when None) and its node count, by sinfo; None when sinfo cannot say."""
    command = ["sinfo", "-h", "-o", "%D %P"] + ([f"--partition={partition}"] if partition else [])
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return partition or "default", None
    for line in out.splitlines():
        count, _, name = line.partition(" ")
        if partition or name.endswith("*"):  # sinfo marks the default partition with a star
            return name.rstrip("*"), int(count) if count.isdigit() else None
    return partition or "default", None


def submit(request: SlurmRequest, template: str | None = None) -> str:
    """Render the script, hand it to sbatch, and return the SLURM job id."""
    command = request.sbatch_command()
    script = render_script(request.variables(), template)
    try:
        proc = subprocess.run(command, input=script, capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    except FileNotFoundError:
        raise ClusterError(
            "sbatch is not installed here; run `tuneyard submit --slurm` on a SLURM login node "
            "(or, for a local test cluster, apt-get install slurm-wlm and run slurm/local-cluster.sh up)"
        ) from None
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"sbatch did not answer within {SBATCH_TIMEOUT_S}s; is slurmctld up (scontrol ping) and SLURM_CONF right?"
        ) from None
    if proc.returncode != 0:
        raise ClusterError(_sbatch_refusal(proc.stderr, request))
    job_id = proc.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise ClusterError(f"sbatch answered '{proc.stdout.strip()}' instead of a job id")
    return job_id


def never_starts(job_id: str, request: SlurmRequest) -> str | None:
    """Why a just-queued job can never start (sites without EnforcePartLimits queue it anyway), or None."""
    try:
        reason = job_info(job_id).get("Reason", "")
    except ClusterError:
        return None
    if reason == "PartitionNodeLimit":
        return f"job {job_id} is pending with reason PartitionNodeLimit and will not start: " + _too_many_nodes(request)
    return None


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, NodeList, StdOut, Restarts, ...)."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id):
        raise ClusterError(f"'{job_id}' is not a SLURM job id (a number, as sbatch printed it)")
    try:
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S
        )
    except FileNotFoundError:
        raise ClusterError("scontrol is not installed here; run this on a SLURM login node") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ClusterError(
            f"SLURM does not know job {job_id} ({proc.stderr.strip() or 'no answer'}); "
            "finished jobs are forgotten after MinJobAge, see sacct if accounting is enabled"
        )
    info = {}
    # one line of Key=Value pairs; values have no spaces except a few (Command may), which we leave cut
    for token in proc.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            info[key] = value
    return info


def stop(job_id: str) -> None:
    """Cancel a SLURM job (scancel); its Ray and training end with it."""
    job_info(job_id)  # a clear error for an unknown id
    proc = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    if proc.returncode != 0:
        raise ClusterError(f"scancel {job_id} failed: {proc.stderr.strip()}")


def output_pattern(log_dir: str | Path) -> str:
    """sbatch's --output for a job whose output goes to `log_dir`/slurm-JOBID.out."""
    folder = str(log_dir)
    if "\\" in folder:
        # sbatch expands no %j at all in a file name holding a backslash: every run would share one file
        raise ClusterError(
            f"the run directory's logs folder {folder} holds a backslash, which sbatch's --output reads as 'expand "
            "nothing' (every job would write slurm-%j.out literally); choose an output.dir without one"
        )
    # a % of the folder's own name is data, not one of sbatch's %-patterns
    return str(Path(folder.replace("%", "%%")) / "slurm-%j.out")


def log_path(job_id: str) -> Path:
    """The job's sbatch output file (Ray start-up, then the `tuneyard train` console): RUN_DIR/logs/slurm-JOBID.out.

    SLURM's StdOut, so a job submitted before the output moved to the run directory (or by hand) is found too.
    """
    return Path(job_info(job_id)["StdOut"])


def wait_for_nodes(address: str, count: int, timeout_s: float) -> int:
    """Connect to the Ray at `address` and wait until `count` nodes are alive; return how many are."""
    import ray

    deadline = time.monotonic() + timeout_s
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        while True:
            alive = sum(1 for node in ray.nodes() if node.get("Alive"))
            if alive >= count or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m tuneyard.cluster.slurm wait-nodes ADDRESS N SECONDS`: exit 0 once N Ray nodes are alive, 1 after."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 4 or args[0] != "wait-nodes":
        print("usage: python -m tuneyard.cluster.slurm wait-nodes ADDRESS NODES SECONDS", file=sys.stderr)
        return 2
    address, count, timeout_s = args[1], int(args[2]), float(args[3])
    alive = wait_for_nodes(address, count, max(timeout_s, 1.0))
    print(f"{alive} of {count} Ray node(s) alive at {address}")
    return 0 if alive >= count else 1


if __name__ == "__main__":
    sys.exit(main())
