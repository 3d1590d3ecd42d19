"""The process group and its collectives: joining a launcher's world (or making one of one), sums and broadcasts
across ranks, and naming the ranks that froze or died."""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from pipeline.errors import UserError


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool = False  # a launcher started this process (not a world of one made here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_launched() -> bool:
    """True inside a process the deepspeed launcher (or torchrun) started: it sets the rendezvous address with the
    ranks, where a world of one made by init_distributed sets the ranks alone."""
    return "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ


def local_rank() -> int | None:
    """This process's index on its node when a launcher started it (LOCAL_RANK), else None."""
    return int(os.environ["LOCAL_RANK"]) if is_launched() else None


def default_device() -> torch.device:
    return torch.device("cuda", local_rank() or 0) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(single_process_group: bool = True, timeout_s: int = 600) -> Dist:
    """Join the launcher's process group, or (single_process_group) create a group of one as DeepSpeed needs.

    Without single_process_group, a process no launcher started gets a world of one and no group (evaluate).
    A collective that waits more than timeout_s for another process raises instead of hanging forever.

    A world of one is made on a free local port. DeepSpeed reads this process's rank from the environment, not
    from the process group, and not only while it starts (ZeRO-3 reads LOCAL_RANK at every forward pass), so
    a process no launcher started gets the rank variables a launcher would have set (not the rendezvous address,
    so is_launched() still tells the two apart).
    """
    launched = is_launched()
    if not launched and not single_process_group:
        return Dist(0, 1, 0, default_device())
    cuda = torch.cuda.is_available()
    if not torch_dist.is_initialized():
        backend, timeout = "nccl" if cuda else "gloo", timedelta(seconds=timeout_s)
        if launched:  # the launcher's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
            try:
                torch_dist.init_process_group(backend, timeout=timeout)
            except torch_dist.DistNetworkError as e:
                if "EADDRINUSE" not in str(e):
                    raise
                port = os.environ.get("MASTER_PORT")
                raise UserError(f"train: the rendezvous port {port} (train.master_port, or the launcher's --master_port) is in use on"
                                f" this machine: choose another (-S train.master_port={int(port) + 100}) or stop what holds it"
                                f" (ss -ltnp | grep {port})") from None
        else:
            torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, timeout=timeout)
    if not launched:
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    device = default_device()
    if cuda:
        torch.cuda.set_device(device)
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), local_rank() or 0, device, launched)


def leave_process_group(dist: Dist) -> None:
    """End a launched process's part in its group once every rank is done, so that no rank tears down its gloo
    threads while another still talks to it. (An abort at interpreter exit could still follow: run_stage in
    console.py ends launched processes with os._exit.)"""
    if dist.launched and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if torch_dist.get_world_size() == 1:
        return [float(v) for v in values]  # a world of one: nothing to add
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when flag is true on at least one: all ranks then take the same branch."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def broadcast(obj, src: int = 0):
    """rank src's obj on every rank."""
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def collective_failure(e: BaseException) -> str | None:
    """What a failed collective means for the user ("frozen" or "gone"), or None when e is something else."""
    text = str(e)
    if isinstance(e, RuntimeError) and re.search(r"[Tt]imed out|[Tt]imeout", text):
        return "frozen"
    if isinstance(e, RuntimeError) and re.search(r"Connection (closed|reset)|Broken pipe|connection refused", text, re.I):
        return "gone"
    return None


def unresponsive_ranks(dist: Dist, wait_s: float) -> list[int]:
    """After a collective failed: the ranks that do not check in within wait_s through the rendezvous store.

    Every live rank writes its key and then waits for the others' keys, so the ones still missing are the frozen
    or dead ones. Empty when the store itself is gone (the rendezvous host died) or the world is one process.
    """
    if dist.world_size == 1:
        return []
    try:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=max(1.0, wait_s)))  # the store lives in rank 0: it may be the frozen one
        store.set(f"gptpipe/alive/{dist.rank}", "1")
        keys = [f"gptpipe/alive/{r}" for r in range(dist.world_size)]
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(keys):
            time.sleep(0.2)
        return [r for r, key in enumerate(keys) if not store.check([key])]
    except (RuntimeError, ValueError, OSError):
        return []


def barrier() -> None:
    torch_dist.barrier()
