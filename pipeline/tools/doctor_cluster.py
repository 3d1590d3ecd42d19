"""`gptpipe doctor`, the cluster of a hostfile: its runner, ssh to each host, the same code and packages there, and
the master port reached from every other host."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from pipeline.config.train import TrainConfig
from pipeline.errors import UserError
from pipeline.infra.launcher import parse_hostfile, selection_problems
from pipeline.tools.doctor_machine import Result

SSH_CONNECT_TIMEOUT = 5  # seconds ssh may spend connecting; the whole call gets a few more
# BatchMode fails instead of prompting for a password or passphrase, exactly as pdsh would need it;
# accept-new records a first-seen host key instead of asking the yes/no question.
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}", "-o", "StrictHostKeyChecking=accept-new"]
# The programs DeepSpeed's multi-node runners start (deepspeed --launcher NAME); pdsh is its default.
RUNNER_PROGRAMS = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "impi": "mpirun", "mvapich": "mpirun", "slurm": "srun"}


def check_cluster(train: TrainConfig, hostfile: str) -> list[Result]:
    """The hostfile, then what the launcher will do with it: its runner, ssh to each host, the same code there.

    train.launcher_args stands for the flags given to the launcher (in params, or by hand on its command line).
    """
    try:
        hosts = parse_hostfile(hostfile)
    except UserError as e:
        return [("hostfile", False, str(e))]
    summary = ", ".join(f"{host} ({slots})" for host, slots in hosts)
    results: list[Result] = [("hostfile", True, f"{hostfile}: {len(hosts)} host(s), {sum(s for _, s in hosts)} slots: {summary}")]
    if train.include or train.exclude:
        problems = selection_problems(train, hosts)
        results.append(("include/exclude", not problems, "; ".join(problems) or f"the hosts and slots named are in {hostfile}"))
    args = " ".join(train.launcher_args).replace("=", " ").split()
    no_ssh, no_ssh_check, master_addr = "--no_ssh" in args, "--no_ssh_check" in args, "--master_addr" in args
    launcher = runner_name(train.launcher_args)
    if len(hosts) > 1 and not no_ssh:
        results.append(check_runner(launcher))
    if train.launcher != "deepspeed":
        results.append(("launcher", True, "dvc repro and `gptpipe train` run one process: set train.launcher: deepspeed for them to"
                        f" use the hostfile; by hand, `deepspeed --hostfile {hostfile} ... --module pipeline.train` needs no setting"))
    if (no_ssh_check or no_ssh) and not master_addr:
        # The launcher skips its ssh check but, given a hostfile, still asks the first host for its address over ssh.
        first = hosts[0][0]
        code, out = ssh(first, "hostname -I") if shutil.which("ssh") else (1, "no ssh client")
        flag = "--no_ssh" if no_ssh else "--no_ssh_check"
        if code == 0 and out.split():
            results.append(("master address", True, f"`ssh {first} hostname -I` answers {out.split()[0]}: the launcher uses it"))
        else:
            results.append(("master address", False, f"{flag} still leaves the launcher running `ssh {first} hostname -I` to find the"
                            f" rendezvous address, which fails here ({out or 'no answer'}): add --master_addr <first host's address>"
                            " (127.0.0.1 on one machine)"))
    if no_ssh or no_ssh_check:
        results.append(("ssh", True, "not needed: " + ("--no_ssh starts each node by hand" if no_ssh else "--no_ssh_check is set")))
        return results
    if shutil.which("ssh") is None:
        results.append(("ssh", False, "no ssh client on PATH: apt-get install openssh-client (the launcher reaches every host by ssh)"))
        return results
    local, packages = local_revision(), package_versions()
    master = master_address(train.launcher_args, hosts[0][0])
    # Something must answer on the master port while the other hosts try it: this machine listens (it is the first
    # node, where the launcher and torch's rendezvous store run) for as long as the host checks take.
    with listening(train.master_port) as listener_problem:
        def one_host(host: str) -> list[Result]:
            found = check_host(host, local)
            if found[0][1]:  # reachable by ssh: the same packages, and the master port from there
                found.append(check_host_packages(host, packages))
                if host != hosts[0][0]:
                    found.append(check_host_reaches(host, master, train.master_port, listener_problem))
            return found

        with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:  # a slow host costs its timeout once, not once per host
            for host_results in pool.map(one_host, [host for host, _ in hosts]):
                results += host_results
    return results


# The packages whose versions must agree on every host: a mismatch fails late (a collective that hangs, a checkpoint
# one host cannot read) or silently (other numerics).
SAME_EVERYWHERE = ("torch", "deepspeed", "transformers", "gptpipe", "tokenizers", "safetensors")
VERSIONS_PROGRAM = (
    "import importlib.metadata as m\n"
    "for name in {names!r}:\n"
    "    try: print(name, m.version(name))\n"
    "    except m.PackageNotFoundError: print(name, 'missing')\n"
)


def package_versions() -> dict[str, str]:
    """name -> version (or 'missing') of SAME_EVERYWHERE in this Python."""
    found = {}
    for name in SAME_EVERYWHERE:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def versions_command() -> str:
    """The shell command that prints SAME_EVERYWHERE's versions in this Python's path on another host: the launcher
    starts every node with the interpreter of this path (sys.executable), so that is the one that must agree."""
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(VERSIONS_PROGRAM.format(names=SAME_EVERYWHERE))}"


def version_differences(local: dict[str, str], remote_output: str) -> list[str]:
    """'name here X, there Y' for each package that differs; remote_output is what versions_command printed."""
    remote = dict(line.split(" ", 1) for line in remote_output.splitlines() if " " in line)
    return [f"{name} {local[name]} here, {remote.get(name, 'unknown')} there" for name in local if remote.get(name) != local[name]]


def check_host_packages(host: str, local: dict[str, str]) -> Result:
    code, out = ssh(host, versions_command(), whole=True)
    if code != 0:
        return (f"packages on {host}", False, f"{sys.executable} does not run there ({out.splitlines()[-1] if out else 'failed'}):"
                " install gptpipe at the same path on every host (the launcher uses this interpreter's path)")
    differ = version_differences(local, out)
    if differ:
        return (f"packages on {host}", False, "; ".join(differ) + ": install the same versions there (scripts/setup.sh with this constraints.txt)")
    return (f"packages on {host}", True, ", ".join(f"{k} {v}" for k, v in local.items()) + ", as here")


def master_address(launcher_args: list[str], first_host: str) -> str:
    """The address the other nodes rendezvous at: --master_addr when given, else the hostfile's first host."""
    args = " ".join(launcher_args).replace("--master_addr=", "--master_addr ").split()
    return args[args.index("--master_addr") + 1] if "--master_addr" in args[:-1] else first_host


REACH_PROGRAM = "import socket, sys\nsocket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"


def reach_command(address: str, port: int) -> str:
    """The shell command that connects to address:port with python3 (any Python will do): exit code 0 when it can."""
    return f"python3 -c {shlex.quote(REACH_PROGRAM)} {shlex.quote(address)} {port}"


def check_host_reaches(host: str, address: str, port: int, listener_problem: str | None) -> Result:
    name = f"master port from {host}"
    if listener_problem:
        return name, False, f"not tried: nothing could listen on {port} here ({listener_problem})"
    code, out = ssh(host, reach_command(address, port))
    if code != 0:
        return name, False, (f"{host} cannot connect to {address}:{port} ({out or 'failed'}): open the port in the firewall between"
                             " the nodes, or set train.master_port (and --master_addr in train.launcher_args) to one they can reach")
    return name, True, f"{host} connects to {address}:{port}"


@contextmanager
def listening(port: int):
    """A socket accepting (and closing) connections on port on every interface while the block runs; yields None, or
    why nothing could listen (the port is taken: check_master_port says so too)."""
    import socket
    import threading

    try:
        server = socket.create_server(("", port), reuse_port=False)
    except OSError as e:
        yield str(e)
        return
    server.settimeout(0.2)
    done = threading.Event()

    def accept():
        while not done.is_set():
            try:
                server.accept()[0].close()
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield None
    finally:
        done.set()
        thread.join()
        server.close()


def runner_name(launcher_args: list[str]) -> str:
    """The multi-node runner named in train.launcher_args (--launcher X or --launcher=X); pdsh by default."""
    args = " ".join(launcher_args).replace("--launcher=", "--launcher ").split()
    return args[args.index("--launcher") + 1].lower() if "--launcher" in args[:-1] else "pdsh"


def check_runner(launcher: str) -> Result:
    program = RUNNER_PROGRAMS.get(launcher, launcher)
    if shutil.which(program):
        return launcher, True, f"{program} found: the deepspeed launcher starts the other hosts with it"
    if launcher == "pdsh":
        fix = "apt-get install pdsh, or pick another runner: train.launcher_args: [--launcher, openmpi] (or slurm, mpich, ...)"
    else:
        fix = f"install {program} on this machine, or use the default runner (apt-get install pdsh; drop --launcher)"
    return launcher, False, f"{program} not on PATH; a hostfile with several hosts needs it: {fix}"


def check_host(host: str, local: tuple[str | None, str]) -> list[Result]:
    """Passwordless ssh to host, then whether its checkout (at this directory's path) is at our commit."""
    code, out = ssh(host, "true")
    if code != 0:
        fix = (
            f"set up passwordless ssh keys (ssh-keygen; ssh-copy-id {host}) until `ssh {host} true` works without a prompt;"
            " on a single machine unset train.hostfile, or pass --no_ssh_check --master_addr 127.0.0.1 to the launcher"
            " (train.launcher_args, or doctor --launcher-args for the flags you type by hand)"
        )
        return [(f"ssh {host}", False, f"{out or 'failed'}: {fix}")]
    results: list[Result] = [(f"ssh {host}", True, "reachable without a password")]
    head, note = local
    if head is None:
        results.append((f"code on {host}", True, f"not compared: {note}; make sure every host runs the same code"))
        return results
    # The launcher runs `cd <this directory>` on every host, so the code must live at the same path there.
    cwd = str(Path.cwd().resolve())
    code, out = ssh(host, f"git -C {shlex.quote(cwd)} rev-parse HEAD")
    if code != 0:
        detail = f"no git checkout at {cwd} ({out}): clone the repo to the same path on {host}"
        results.append((f"code on {host}", False, detail))
    elif out != head:
        detail = f"{host} is at {out[:10]}, this machine at {head[:10]}: run git pull / sync the repo on {host}{note}"
        results.append((f"code on {host}", False, detail))
    else:
        results.append((f"code on {host}", True, f"same commit {head[:10]}{note}"))
    return results


def ssh(host: str, command: str, whole: bool = False) -> tuple[int, str]:
    """(exit code, last line of output, or all of it when whole) of a command on host; never prompts, never waits past
    the timeout."""
    try:
        proc = subprocess.run(
            ["ssh", *SSH_OPTIONS, host, command],
            stdin=subprocess.DEVNULL,  # nothing to type a password into, even if BatchMode is overridden in ~/.ssh/config
            capture_output=True,
            text=True,
            timeout=SSH_CONNECT_TIMEOUT + 10,
        )
    except subprocess.TimeoutExpired:
        return 124, f"ssh {host} gave no answer within {SSH_CONNECT_TIMEOUT + 10} s"
    text = proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip() or proc.stdout.strip()
    if whole:
        return proc.returncode, text
    lines = text.splitlines()
    return proc.returncode, lines[-1] if lines else ""


def local_revision() -> tuple[str | None, str]:
    """(HEAD commit or None, a note): the note says why there is none, or that the tree has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"git failed here ({e})"
    if head.returncode != 0:
        return None, f"no git commit here ({(head.stderr.strip().splitlines() or ['git failed'])[-1]})"
    # Other hosts run what is committed and pulled there, not this machine's uncommitted edits.
    dirty = status.returncode == 0 and status.stdout.strip()
    return head.stdout.strip(), "; note: this checkout has uncommitted changes, which other hosts lack" if dirty else ""
