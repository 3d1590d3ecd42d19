"""The deepspeed launcher: hostfiles checked line by line, and the train stage run again under the launcher."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.output import Echo, silent

HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\d+)\s*(#.*)?$")


EXPECTED_LINE = "expected `HOSTNAME slots=N`, e.g. `worker-1 slots=8` (see hostfile.example)"


HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def valid_host(host: str) -> bool:
    """A DNS host name (RFC 1123 labels; `_` allowed, as some clusters use it) or an IP address."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return len(host) <= 253 and all(HOST_LABEL.match(label) for label in host.rstrip(".").split("."))


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile as (host, slots) pairs; UserError listing every bad line as file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: hostfile not found: create it (see hostfile.example) or unset train.hostfile for one machine")
    hosts: dict[str, tuple[int, int]] = {}  # host -> (slots, line number)
    problems = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}): is this the hostfile?") from None
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            problems.append(f"{path}:{number}: {line!r}: {EXPECTED_LINE}")
            continue
        host, slots = match["host"], int(match["slots"])
        if not valid_host(host):
            # The launcher hands host names to ssh and pdsh: `-oProxyCommand=...` would be an option, not a host.
            problems.append(f"{path}:{number}: {host!r} is not a host name or IP address (letters, digits, '-' and '.',"
                            " not starting with '-')")
        elif slots < 1:
            problems.append(f"{path}:{number}: {host} has slots=0: give it at least one slot or remove the line")
        elif host in hosts:  # the launcher refuses duplicates
            problems.append(f"{path}:{number}: {host} is already listed on line {hosts[host][1]}: keep one line per host")
        else:
            hosts[host] = (slots, number)
    if not problems and not hosts:
        problems.append(f"{path}: no hosts: {EXPECTED_LINE}")
    if problems:
        raise UserError("\n".join(problems))
    return [(host, slots) for host, (slots, _) in hosts.items()]


def launcher_command(train: TrainConfig, args: list[str]) -> list[str]:
    """The `deepspeed` launcher command line that runs the train stage (`python -m pipeline.train`) on every node and
    process of train.*."""
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [exe]
    if train.hostfile:
        if not Path(train.hostfile).is_file():
            raise UserError(f"train.hostfile: {train.hostfile} not found")
        try:
            parse_hostfile(train.hostfile)
        except UserError as e:
            raise UserError(f"train.hostfile: {e}") from None
        cmd += ["--hostfile", train.hostfile]
    if train.num_nodes:
        cmd += ["--num_nodes", str(train.num_nodes)]
    if train.num_gpus:
        cmd += ["--num_gpus", str(train.num_gpus)]
    if train.include:
        cmd += ["--include", train.include]
    if train.exclude:
        cmd += ["--exclude", train.exclude]
    cmd += ["--master_port", str(train.master_port), *train.launcher_args]
    # Each process reads its rank from LOCAL_RANK, which the launcher sets: no --local_rank argument is needed.
    return cmd + ["--no_local_rank", "--module", "pipeline.train", *args]


def relaunch(train: TrainConfig, params_file: str | Path, overrides: list[str], echo: Echo = silent) -> int:
    """Run the train stage again under the deepspeed launcher (train.launcher=deepspeed); its exit code.

    Every node runs the same command in the same directory: gptpipe must be installed there on each (this
    repository's checkout with its .venv, or the package for a `gptpipe init` project).
    """
    args = ["--params", str(Path(params_file).resolve()), *[f"--set={s}" for s in overrides]]
    cmd = launcher_command(train, args)
    echo(f"train: launching {' '.join(cmd)}")
    return subprocess.call(cmd)
