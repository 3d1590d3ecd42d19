"""`gptpipe doctor`: the checks people run by hand before a (multi-node) DeepSpeed run, each with its fix."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from pipeline.config import Params, TrainConfig
from pipeline.errors import UserError
from pipeline.files import free_bytes
from pipeline.infra.deepspeed import deepspeed_installation
from pipeline.infra.launcher import parse_hostfile, port_problem, selection_problems

Result = tuple[str, bool, str]  # (check name, ok, detail; a problem's detail says the fix)

SSH_CONNECT_TIMEOUT = 5  # seconds ssh may spend connecting; the whole call gets a few more
# BatchMode fails instead of prompting for a password or passphrase, exactly as pdsh would need it;
# accept-new records a first-seen host key instead of asking the yes/no question.
SSH_OPTIONS = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}", "-o", "StrictHostKeyChecking=accept-new"]
# The programs DeepSpeed's multi-node runners start (deepspeed --launcher NAME); pdsh is its default.
RUNNER_PROGRAMS = {"pdsh": "pdsh", "openmpi": "mpirun", "mpich": "mpirun", "impi": "mpirun", "mvapich": "mpirun", "slurm": "srun"}


def run_checks(p: Params, hostfile: str | None = None) -> list[Result]:
    """Every check for this machine and these params, then for each host of the hostfile when one is given."""
    train = p.train
    results = [check_python(), *check_torch(train), *check_deepspeed(train), check_backend(), check_master_port(train.master_port),
               check_packages(), *check_sources(p), check_disk(p)]
    if hostfile:
        results += check_cluster(train, hostfile)
    elif train.include or train.exclude:
        problems = selection_problems(train, None)
        results.append(("include/exclude", not problems, "; ".join(problems) or "localhost only, as the launcher has it without a hostfile"))
    return results


# --------------------------------------------------------------------------------------- this machine


def check_python() -> Result:
    version = platform.python_version()
    ok = sys.version_info >= (3, 10)
    return "python", ok, f"{version} ({sys.executable})" + ("" if ok else ": gptpipe needs Python 3.10 or newer")


def check_torch(train: TrainConfig) -> list[Result]:
    results: list[Result] = [("torch", True, f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if not torch.cuda.is_available():
        results.append(("devices", True, "no CUDA GPU: training runs on CPU with the gloo backend (fine for small models)"))
        return results
    count = torch.cuda.device_count()
    names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count))
    if train.num_gpus and train.num_gpus > count:
        fix = f"train.num_gpus={train.num_gpus} but this machine has {count}: lower it, or set it to null to use all"
        results.append(("devices", False, f"{count} GPU(s) ({names}); {fix}"))
    else:
        results.append(("devices", True, f"{count} GPU(s): {names}"))
    return results


def check_deepspeed(train: TrainConfig) -> list[Result]:
    """DeepSpeed's version, the precision its accelerator supports, and which C++/CUDA ops it can use."""
    try:
        ds = deepspeed_installation()
    except Exception as e:  # noqa: BLE001 - reported: a broken install raises more than ImportError (e.g. missing CUDA)
        fix = "pip install deepspeed (scripts/setup.sh installs it without build isolation)"
        return [("deepspeed", False, f"cannot import deepspeed ({type(e).__name__}: {e}): {fix}")]
    results: list[Result] = [("deepspeed", True, f"{ds.version} (accelerator: {ds.accelerator})")]

    supported = ds.supports[train.precision]
    detail = f"{ds.accelerator} supports train.precision={train.precision}"
    results.append(("precision", supported, detail if supported else f"{ds.accelerator} does not support train.precision="
                    f"{train.precision}: set it to fp32 (or bf16 where supported)"))

    ninja = shutil.which("ninja")
    cxx = shutil.which(os.environ.get("CXX", "c++"))  # the compiler torch.utils.cpp_extension calls
    detail = (
        f"prebuilt: {', '.join(ds.prebuilt_ops) or 'none'}; JIT-compatible: {', '.join(ds.compatible_ops) or 'none'};"
        f" ninja: {ninja or 'missing'}; C++ compiler: {cxx or 'missing'}" + (f"; probe failed: {', '.join(ds.failed_probes)}" if ds.failed_probes else "")
    )
    # Only offload needs a compiled op: the engine uses torch's AdamW otherwise (infra/deepspeed.py's deepspeed_config).
    problem = ""
    if train.offload_optimizer and "cpu_adam" not in ds.prebuilt_ops:
        if "cpu_adam" not in ds.compatible_ops:
            problem = "train.offload_optimizer needs DeepSpeed's cpu_adam op, which cannot be built here: set it to false"
        elif not (ninja and cxx):
            problem = (
                "train.offload_optimizer JIT-compiles DeepSpeed's cpu_adam op, which needs ninja and a C++ compiler on"
                " PATH: pip install ninja; apt-get install g++ (or set offload_optimizer: false)"
            )
    results.append(("deepspeed ops", not problem, f"{detail}. {problem}" if problem else detail))
    return results


def check_backend() -> Result:
    dist = torch.distributed
    if not dist.is_available():
        return "backend", False, "this torch build has no torch.distributed: install a standard torch wheel"
    if torch.cuda.is_available():
        if dist.is_nccl_available():
            return "backend", True, "nccl (GPUs)"
        return "backend", False, "CUDA is available but NCCL is not in this torch build: install a CUDA wheel of torch"
    if dist.is_gloo_available():
        return "backend", True, "gloo (CPU)"
    return "backend", False, "gloo is not in this torch build: install a standard CPU wheel of torch"


def check_master_port(port: int) -> Result:
    """Bind the rendezvous port as torch's TCPStore will, on every interface of this (the first) node."""
    problem = port_problem(port)
    return ("master port", False, problem) if problem else ("master port", True, f"{port} is free on this machine")


def check_packages() -> Result:
    names = ("transformers", "tokenizers", "datasets", "dvc", "dvclive", "tiktoken")
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing" + (" (optional: pip install 'gptpipe[data]')" if name == "datasets" else ""))
    missing = [f for f in found if f.endswith("missing")]
    return "packages", not missing, ", ".join(found) + (": reinstall with scripts/setup.sh" if missing else "")


def check_sources(p: Params) -> list[Result]:
    """Whether model.init and tokenize.pretrained can be had: a local folder, the Hugging Face cache, or the hub."""
    results = []
    for key, name in (("model.init", None if p.model.is_scratch else p.model.init), ("tokenize.pretrained", p.tokenize.pretrained)):
        if name:
            results.append(reachable(key, name))
    return results


def reachable(key: str, name: str) -> Result:
    if Path(name).exists():
        ok = Path(name).is_dir() and any((Path(name) / f).is_file() for f in ("config.json", "tokenizer.json", "tokenizer_config.json"))
        return key, ok, f"{name}: a local folder" + ("" if ok else " without config.json or tokenizer files: save one there with save_pretrained")
    from huggingface_hub import try_to_load_from_cache

    for file in ("config.json", "tokenizer_config.json"):
        if isinstance(try_to_load_from_cache(name, file), str):
            return key, True, f"{name}: in the Hugging Face cache (works offline)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return key, False, f"{name}: not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once with network access"
    gated = " Gated models (Gemma, Llama) need their licence accepted on the hub and HF_TOKEN set (huggingface-cli login)."
    try:
        from huggingface_hub import model_info
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

        info = model_info(name, timeout=10)
        # The hub describes a gated repo to anyone; only the download needs the accepted licence and a token.
        if getattr(info, "gated", False) and not (os.environ.get("HF_TOKEN") or _saved_hf_token()):
            return key, False, f"{name}: gated on the hub ({info.gated} approval) and no HF_TOKEN is set.{gated}"
        return key, True, f"{name}: on the hub; it downloads on first use (set HF_HOME to cache it somewhere roomy)"
    except GatedRepoError:
        return key, False, f"{name}: gated on the hub.{gated}"
    except RepositoryNotFoundError:
        return key, False, f"{name}: no such model on the hub (or private: set HF_TOKEN).{gated}"
    except Exception as e:  # noqa: BLE001 - any network failure is the same answer: not reachable from here
        return key, False, f"{name}: the hub is unreachable ({type(e).__name__}); use a local folder, or download it once elsewhere.{gated}"


def _saved_hf_token() -> str | None:
    """The token `huggingface-cli login` saved, if any."""
    try:
        from huggingface_hub import get_token

        return get_token()
    except ImportError:
        return None


def check_disk(p: Params) -> Result:
    """Free space where checkpoints go, against what the run keeps: weights, Adam's two moments (and fp32 masters)."""
    folder = Path(p.train.out_dir)
    free = free_bytes(folder)
    n = estimated_parameters(p)
    if n is None:
        return "disk", True, f"{free / 1e9:,.1f} GB free for train.out_dir ({folder}); model size unknown here"
    per_checkpoint = n * (16 if p.train.precision == "fp32" else 18)  # weights 4 (or 2 + 4 master) + Adam 8 + rounding
    kept = p.train.keep_last + 2  # plus the best and the one being written
    need = per_checkpoint * kept + n * 4
    detail = (f"{free / 1e9:,.1f} GB free for train.out_dir ({folder}); a checkpoint of {n / 1e6:,.1f}M parameters is about"
              f" {per_checkpoint / 1e9:,.2f} GB, {kept} kept at once about {need / 1e9:,.2f} GB")
    return "disk", free >= need, detail + ("" if free >= need else ": free space, lower train.keep_last, or move train.out_dir")


def estimated_parameters(p: Params) -> int | None:
    """The model's parameter count from its config alone (built on the meta device: no memory, no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.model.build import count_params, init_config_dir, scratch_config

    try:
        if p.model.is_scratch:
            vocab = p.tokenize.vocab_size if p.tokenize.kind == "bpe" else 50257
            config = scratch_config(p.model, vocab, 0)
        elif Path(p.model.init).is_dir():
            config = AutoConfig.from_pretrained(init_config_dir(p.model.init), trust_remote_code=p.model.trust_remote_code)
        else:
            return None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=p.model.trust_remote_code)
        return count_params(model)
    except (OSError, ValueError):
        return None


# -------------------------------------------------------------------------------------------- cluster


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
