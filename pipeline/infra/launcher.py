"""The deepspeed launcher: hostfiles checked line by line, and the train stage run again under the launcher."""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.files import absent
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
        raise UserError(f"{path}: hostfile {absent(path)}: create it (see hostfile.example) or unset train.hostfile for one machine")
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


def selection_problems(train: TrainConfig, hosts: list[tuple[str, int]] | None) -> list[str]:
    """What in train.include / train.exclude the hostfile's hosts (None: this machine only, `localhost`) do not
    have: a host it does not list, or a slot at or past the host's slots."""
    slots = dict(hosts) if hosts is not None else None
    problems = []
    for key in ("include", "exclude"):
        spec = getattr(train, key)
        if not spec:
            continue
        for node in spec.split("@"):
            host, _, listed = node.partition(":")
            if slots is None:
                if host != "localhost":
                    problems.append(f"train.{key}: {host} is not this machine: without train.hostfile the launcher knows only"
                                    " localhost (add a hostfile listing it)")
                continue
            if host not in slots:
                problems.append(f"train.{key}: {host} is not in the hostfile ({', '.join(slots)})")
                continue
            for slot in (int(x) for x in listed.split(",") if x):
                if slot >= slots[host]:
                    problems.append(f"train.{key}: {host}:{slot}: the hostfile gives {host} slots={slots[host]} (slots 0-{slots[host] - 1})")
    return problems


def port_problem(port: int) -> str | None:
    """Why the rendezvous port cannot be used on this machine (another program holds it), or None: bound as
    torch's TCPStore will bind it, on every interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # TCPStore sets SO_REUSEADDR too, so a port left in TIME_WAIT by the last run is not a false alarm.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            return (f"{port} is in use on this machine ({e.strerror}): choose another train.master_port"
                    f" (-S train.master_port={port + 100}) or stop what holds it (ss -ltnp | grep {port})")
    return None


def launcher_command(train: TrainConfig, args: list[str]) -> list[str]:
    """The `deepspeed` launcher command line that runs the train stage (`python -m pipeline.train`) on every node and
    process of train.*."""
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cmd = [exe]
    if train.hostfile:
        if not Path(train.hostfile).is_file():
            raise UserError(f"train.hostfile: {train.hostfile} {absent(train.hostfile)}")
        try:
            hosts = parse_hostfile(train.hostfile)
        except UserError as e:
            raise UserError(f"train.hostfile: {e}") from None
        cmd += ["--hostfile", train.hostfile]
    problems = selection_problems(train, hosts if train.hostfile else None)
    if problems:
        raise UserError("\n".join(problems))
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
    if not train.hostfile:  # this machine is the first node: its port must be free (with a hostfile, doctor checks)
        problem = port_problem(train.master_port)
        if problem:
            raise UserError(f"train.master_port: {problem}")
    echo(f"train: launching {' '.join(cmd)}")
    return subprocess.call(cmd)
