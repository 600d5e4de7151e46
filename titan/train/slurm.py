"""What Slurm's environment says about this process: is it one rank of the job, and where is
the rendezvous.

- `srun` with several tasks (scripts/slurm.sbatch): every task is one rank. srun sets
  SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID and the node list, but not torch's
  MASTER_ADDR/MASTER_PORT: the host is the first node of the step and the port follows from the
  job id, so every task derives the same pair without talking to the others.
- an `sbatch` batch step (the script itself) or a submitit job (a one-task step): one process
  that owns the node. SLURM_PROCID is set there too, yet the process is not one rank of many:
  titan self-launches `parallel.nproc_per_node` workers in it, as on a workstation.
"""

from __future__ import annotations

import os
import re

PORT_BASE, PORT_SPAN = 15000, 10000  # below Linux's ephemeral range (32768+)


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, e.g. 'node[01-03,07],gpu5' -> node01 node02 node03 node07
    gpu5. Zero padding is kept; several bracket groups in one name expand as a product."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", hostlist):
        names = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            suffixes = [literal + n for n in _expand_ranges(ranges)] if ranges else [literal]
            names = [n + s for n in names for s in suffixes]
        hosts.extend(n for n in names if n)
    return hosts


def _expand_ranges(ranges: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not hi:
            out.append(lo)
            continue
        width = len(lo) if lo.startswith("0") else 0
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _env() -> dict:
    return os.environ


def step_tasks() -> int:
    """Tasks Slurm started for this step: SLURM_STEP_NUM_TASKS under srun; a batch step (no
    such variable) runs one copy of the script."""
    return int(_env().get("SLURM_STEP_NUM_TASKS") or 1)


def is_slurm_rank() -> bool:
    """This process is one rank of a job whose ranks srun started (several tasks in the step)."""
    return "SLURM_PROCID" in _env() and step_tasks() > 1


def tasks_on_this_node() -> int:
    """This node's share of the step's tasks, from e.g. SLURM_STEP_TASKS_PER_NODE='8(x2),4'."""
    env = _env()
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    counts: list[int] = []
    for count, repeat in re.findall(r"(\d+)(?:\(x(\d+)\))?", spec):
        counts += [int(count)] * int(repeat or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else (counts[0] if counts else 1)


def rendezvous_host() -> str:
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        hosts = expand_hostlist(_env().get(key, ""))
        if hosts:
            return hosts[0]
    raise RuntimeError("under srun, neither MASTER_ADDR nor a Slurm node list (SLURM_JOB_NODELIST) is set")


def rendezvous_port() -> int:
    """The same port on every task of a job (distinct across concurrent jobs, mostly)."""
    return PORT_BASE + int(_env().get("SLURM_JOB_ID", "0")) % PORT_SPAN


def torch_env_from_slurm() -> dict[str, str]:
    """torch's rank variables for a Slurm rank (MASTER_* kept where the user exported them)."""
    env = _env()
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(step_tasks()),
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(tasks_on_this_node()),
        "MASTER_ADDR": env.get("MASTER_ADDR") or rendezvous_host(),
        "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port()),
    }
