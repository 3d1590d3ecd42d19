"""`gptpipe doctor`: the checks people run by hand before a (multi-node) DeepSpeed run, each with its fix: this
machine's (tools/doctor_machine.py), then the hostfile's cluster (tools/doctor_cluster.py)."""

from __future__ import annotations

from pipeline.config.all import Params
from pipeline.infra.launcher import selection_problems
from pipeline.tools.doctor_cluster import check_cluster
from pipeline.tools.doctor_machine import Result, machine_checks


def run_checks(p: Params, hostfile: str | None = None) -> list[Result]:
    """Every check for this machine and these params, then for each host of the hostfile when one is given."""
    train = p.train
    results = machine_checks(p)
    if hostfile:
        results += check_cluster(train, hostfile)
    elif train.include or train.exclude:
        problems = selection_problems(train, None)
        results.append(("include/exclude", not problems, "; ".join(problems) or "localhost only, as the launcher has it without a hostfile"))
    return results
