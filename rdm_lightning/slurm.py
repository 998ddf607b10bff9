"""``rdm slurm``: write the sbatch file of an ``rdm fit`` and submit it.

The job runs one ``srun`` task per GPU (Lightning's SLURM environment reads the ranks
from SLURM), asks SLURM for SIGUSR1 ``--signal-seconds`` before the time limit and is
requeueable: on SIGUSR1 ``RunCheckpoint`` writes ``checkpoints/last.ckpt`` in the run
folder ``job_<id>``, requeues the job and stops; the requeued job has the same id, so
``rdm fit`` resumes from that folder. See ``docs/runs.md``.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
from pathlib import Path

# SLURM's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$")


def sbatch_script(
    config: str,
    nodes: int,
    gpus_per_node: int,
    time: str,
    job_name: str,
    log_dir: str,
    signal_seconds: int = 90,
    cpus_per_task: int | None = None,
    partition: str | None = None,
    account: str | None = None,
    fit_args: list[str] | None = None,
) -> str:
    """The sbatch file that runs ``rdm fit --config CONFIG`` on ``nodes × gpus_per_node`` GPUs.

    Raises:
        ValueError: a count below 1, a time SLURM does not accept, or a too short signal lead.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if not _TIME.match(time):
        raise ValueError(f"--time {time!r} is not a SLURM time; accepted: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM:SS")
    if signal_seconds < 10:
        raise ValueError(f"--signal-seconds must be >= 10 (time to write a checkpoint), got {signal_seconds}")
    if cpus_per_task is not None and cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task must be >= 1, got {cpus_per_task}")
    options = [
        f"--job-name={job_name}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={gpus_per_node}",  # one task per GPU: Lightning takes its rank from SLURM
        f"--gpus-per-node={gpus_per_node}",
        f"--time={time}",
        f"--signal=SIGUSR1@{signal_seconds}",  # RunCheckpoint: checkpoint, requeue, stop
        "--requeue",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--output={log_dir}/%x-%j.out",
    ]
    if cpus_per_task is not None:
        options.append(f"--cpus-per-task={cpus_per_task}")
    if partition:
        options.append(f"--partition={partition}")
    if account:
        options.append(f"--account={account}")
    command = ["srun", "rdm", "fit", "--config", config, f"--trainer.num_nodes={nodes}", f"--trainer.devices={gpus_per_node}"]
    command += fit_args or []
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in options), "",
             "# The run folder is <logger save_dir>/<name>/job_$SLURM_JOB_ID; a requeue resumes from it.",
             " ".join(shlex.quote(part) for part in command), ""]
    return "\n".join(lines)


def submit(args: argparse.Namespace) -> Path:
    """Write ``<log-dir>/<job-name>.sbatch`` and, unless ``--dry-run``, submit it with ``sbatch``."""
    config = Path(args.config)
    if not config.is_file():
        raise FileNotFoundError(f"--config {str(config)!r} is not a file")
    job_name = args.job_name or config.stem
    fit_args = args.fit_args[1:] if args.fit_args[:1] == ["--"] else args.fit_args
    script = sbatch_script(
        str(config), args.nodes, args.gpus_per_node, args.time, job_name, args.log_dir, args.signal_seconds,
        args.cpus_per_task, args.partition, args.account, fit_args,
    )
    path = Path(args.log_dir) / f"{job_name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(f"rdm slurm: wrote {path}")
    if args.dry_run:
        return path
    if shutil.which("sbatch") is None:
        raise FileNotFoundError(f"`sbatch` is not on PATH: submit {path} from a SLURM login node, or use --dry-run")
    result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {path} failed ({result.returncode}): {result.stderr.strip()}")
    print(result.stdout.strip())
    return path


def add_slurm_parser(commands) -> None:
    """Register ``rdm slurm`` on the tools' subparsers."""
    p = commands.add_parser("slurm", help="write and submit the sbatch file of an `rdm fit`")
    p.add_argument("--config", required=True, help="the `rdm fit` config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--time", required=True, help="SLURM time limit, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--signal-seconds", type=int, default=90, help="SIGUSR1 this long before the limit (default 90)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default=None, help="default: the config's file name")
    p.add_argument("--log-dir", default="runs/slurm", help="folder of the sbatch file and the job logs")
    p.add_argument("--dry-run", action="store_true", help="write the sbatch file only")
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="after `--`: more `rdm fit` arguments")
    p.set_defaults(run=submit)
