"""pipeline.tools.doctor (doctor_machine, doctor_cluster): real checks on this machine (no GPU, no sshd), the hostfile parser, and `gptpipe doctor`."""

import socket
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config.all import Params
from pipeline.errors import UserError
from pipeline.infra.launcher import parse_hostfile
from pipeline.tools.doctor import run_checks

ROOT = Path(__file__).resolve().parents[1]


def by_name(results):
    return {name: (ok, detail) for name, ok, detail in results}


def test_run_checks_without_hostfile_checks_this_machine():
    results = run_checks(Params())
    for name, ok, detail in results:
        assert isinstance(name, str) and isinstance(ok, bool) and detail, (name, ok, detail)
    checks = by_name(results)
    assert {"python", "torch", "deepspeed", "deepspeed ops", "backend", "master port", "packages", "disk"} <= set(checks)
    assert checks["torch"][0] and checks["python"][0]
    assert not any(name.startswith(("hostfile", "ssh")) for name in checks)


def test_run_checks_on_cpu_says_gloo():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    checks = by_name(run_checks(Params()))
    assert checks["backend"] == (True, "gloo (CPU)")
    assert "CPU" in checks["devices"][1] and "gloo" in checks["devices"][1]


def test_master_port_in_use_is_a_problem_with_a_fix():
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        held.listen()
        port = held.getsockname()[1]
        ok, detail = by_name(run_checks(Params(train={'master_port': port})))["master port"]
    assert not ok
    assert str(port) in detail and "train.master_port" in detail


def test_parse_hostfile_reads_deepspeed_syntax(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\n\nworker-1 slots=8\n  worker-2   slots=4  # the small one\n")
    assert parse_hostfile(path) == [("worker-1", 8), ("worker-2", 4)]


def test_shipped_hostfile_example_parses():
    hosts = parse_hostfile(ROOT / "hostfile.example")
    assert hosts == [("worker-1", 8), ("worker-2", 8)]


def test_parse_hostfile_reports_every_bad_line(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("worker-1 slots=8\n# ok\nworker-2 slots=eight\nworker-3\nworker-1 slots=2\nworker-4 slots=0\n")
    with pytest.raises(UserError) as e:
        parse_hostfile(path)
    message = str(e.value)
    assert f"{path}:3: " in message and f"{path}:4: " in message
    assert "slots=N" in message
    assert f"{path}:5: " in message and "line 1" in message  # a duplicate names the first line
    assert f"{path}:6: " in message
    assert f"{path}:1:" not in message


def test_parse_hostfile_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match="not found"):
        parse_hostfile(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(UserError, match="no hosts"):
        parse_hostfile(empty)


def test_unreachable_host_is_a_problem_with_a_fix(tmp_path):
    # No sshd runs here, so ssh to this machine is refused: exactly what an unprepared node looks like.
    path = tmp_path / "hostfile"
    path.write_text("127.0.0.1 slots=1\n")
    checks = by_name(run_checks(Params(train={'launcher': 'deepspeed'}), str(path)))
    assert checks["hostfile"][0]
    assert "pdsh" not in checks  # one host: the launcher runs locally, no pdsh needed
    ok, detail = next(value for name, value in checks.items() if name.startswith("ssh"))
    assert not ok
    assert "ssh" in detail and "--no_ssh_check" in detail
    assert "code on 127.0.0.1" not in checks  # the revision is only compared on reachable hosts


def test_several_hosts_need_a_multi_node_runner(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    checks = by_name(run_checks(Params(train={'launcher': 'deepspeed'}), str(path)))
    ok, detail = checks["pdsh"]
    assert ok or "apt-get install pdsh" in detail
    assert {"ssh 127.0.0.1", "ssh 127.0.0.2"} <= set(checks)


def test_cli_doctor_with_bad_hostfile_exits_1(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {}\n")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-1 slots=8\nworker-2 eight\n")
    # A wide terminal keeps rich from wrapping the detail column.
    result = CliRunner(env={"COLUMNS": "1000"}).invoke(app, ["doctor", "--params", str(params), "--hostfile", str(hostfile)])
    assert result.exit_code == 1, result.output
    assert "problem" in result.output
    assert f"{hostfile}:2: 'worker-2 eight': expected `HOSTNAME slots=N`" in result.output


def test_no_ssh_check_needs_a_master_address_and_then_no_ssh_probe_runs(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("localhost slots=2\n")
    checks = by_name(run_checks(Params(train={"launcher": "deepspeed", "launcher_args": ["--no_ssh_check"]}), str(path)))
    ok, detail = checks["master address"]
    assert not ok and "ssh localhost hostname -I" in detail and "--master_addr" in detail
    checks = by_name(run_checks(Params(train={"launcher": "deepspeed", "launcher_args": ["--no_ssh_check", "--master_addr", "127.0.0.1"]}), str(path)))
    assert "master address" not in checks and checks["ssh"] == (True, "not needed: --no_ssh_check is set")
    assert not any(name.startswith("ssh ") for name in checks)  # no probe of localhost, which has no sshd here


def test_a_hostfile_without_train_launcher_is_the_by_hand_path_not_a_problem(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("localhost slots=2\n")
    checks = by_name(run_checks(Params(train={"launcher_args": ["--no_ssh"]}), str(path)))
    ok, detail = checks["launcher"]
    assert ok and "needs no setting" in detail
    # --no_ssh with a hostfile still has the launcher ask the first host for its address over ssh (no sshd here).
    ok, detail = checks["master address"]
    assert not ok and "--no_ssh still leaves the launcher running `ssh localhost hostname -I`" in detail
    checks = by_name(run_checks(Params(train={"launcher_args": ["--no_ssh", "--master_addr=127.0.0.1"]}), str(path)))
    assert "master address" not in checks


def test_the_flags_typed_by_hand_are_given_to_doctor_on_its_command_line(tmp_path, monkeypatch):
    """hostfile.example's own advice: the by-hand launcher flags make doctor pass on one machine without sshd."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hostfile").write_text("localhost slots=2\n")
    runner = CliRunner(env={"COLUMNS": "1000"})
    result = runner.invoke(app, ["doctor", "--hostfile", "hostfile", "--launcher-args", "--no_ssh_check --master_addr 127.0.0.1"])
    assert result.exit_code == 0, result.output
    assert "not needed: --no_ssh_check is set" in result.output


def test_packages_model_sources_and_disk_are_reported(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "local")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = Params(model={"init": str(tmp_path / "local")}, tokenize={"kind": "hf", "pretrained": "no-such-org/no-such-model"})
    checks = by_name(run_checks(p))
    assert checks["packages"][0] and "transformers " in checks["packages"][1] and "dvc " in checks["packages"][1]
    assert checks["model.init"] == (True, f"{tmp_path / 'local'}: a local folder")
    ok, detail = checks["tokenize.pretrained"]
    assert not ok and "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in detail
    ok, detail = checks["disk"]
    assert ok and "GB free for train.out_dir" in detail
    ok, detail = by_name(run_checks(Params(train={"keep_last": 10**6})))["disk"]  # a million kept checkpoints fit nowhere
    assert not ok and "lower train.keep_last" in detail


def test_the_package_versions_other_hosts_report_are_compared():
    """Issue 21: doctor compares package versions across hosts. Here the command doctor sends over ssh runs in a local
    shell (no sshd here): it must print exactly what this Python has, and a host with another version is named."""
    from pipeline.tools.doctor_cluster import package_versions, version_differences, versions_command

    out = subprocess.run(["bash", "-c", versions_command()], capture_output=True, text=True, timeout=60, check=True).stdout
    local = package_versions()
    assert local["torch"] != "missing" and version_differences(local, out) == []
    other = out.replace(f"transformers {local['transformers']}", "transformers 4.57.0")
    assert version_differences(local, other) == [f"transformers {local['transformers']} here, 4.57.0 there"]


def test_the_master_port_check_connects_to_a_listener_that_doctor_opens():
    """Issue 21: doctor tests that the other nodes reach the master port; the probe it sends over ssh, run locally."""
    from pipeline.tools.doctor_cluster import listening, master_address, reach_command

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    probe = ["bash", "-c", reach_command("127.0.0.1", port)]
    assert subprocess.run(probe, capture_output=True, timeout=30).returncode != 0  # nothing listens yet
    with listening(port) as problem:
        assert problem is None
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    with socket.create_server(("", port)), listening(port) as problem:  # the port taken: said, not raised
        assert problem and "in use" in problem.lower()
    assert master_address(["--no_ssh_check", "--master_addr", "10.0.0.1"], "worker-1") == "10.0.0.1"
    assert master_address(["--master_addr=10.0.0.2"], "worker-1") == "10.0.0.2"
    assert master_address([], "worker-1") == "worker-1"
