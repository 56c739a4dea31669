"""Distributed distillation: the process group, data shards, and launching ``torchrun``.

A run is distributed when ``torchrun`` started it (``WORLD_SIZE`` > 1 in the environment): each
process joins the group (NCCL on GPUs, gloo on CPUs), reads its own shard of every global batch,
and DistributedDataParallel averages the gradients, so all ranks hold the same weights after every
step. ``trimformer distill --nproc-per-node N`` checks the inputs once, then starts ``torchrun``
on this machine with a free port and collects rank 0's result (or the first rank's error).

Several machines: run the plain ``torchrun`` line from docs/DISTILLATION.md on each of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trimformer.errors import UserError

__all__ = [
    "DistContext",
    "check_process_count",
    "free_port",
    "init_distributed",
    "launch_torchrun",
    "under_torchrun",
]

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"
    device: torch.device = torch.device("cpu")  # noqa: RUF009  (immutable default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (counts for sharded evaluation)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.cpu()]

    def any(self, flag: bool) -> bool:
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _resolve_device(preference: str, local_rank: int) -> torch.device:
    if preference not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {preference!r} is not known; choose auto, cpu or cuda")
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when torchrun started us; a single-process context otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    target = _resolve_device(device, local_rank)
    if not under_torchrun():
        return DistContext(device=target)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    ctx = DistContext(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        device=target,
    )
    logger.info("rank %d of %d joined (%s on %s)", ctx.rank, ctx.world, backend, target)
    return ctx


def check_process_count(nproc: int, device: str = "auto") -> None:
    """Refuse more processes than this machine has GPUs (CUDA) or CPU cores (CPU)."""
    if nproc < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {nproc}")
    target = _resolve_device(device, 0)
    if target.type == "cuda":
        have, what = torch.cuda.device_count(), "CUDA GPUs"
    else:
        have, what = os.cpu_count() or 1, "CPU cores"
    if nproc > have:
        raise UserError(
            f"--nproc-per-node {nproc} is more than this machine's {have} {what}; use at most {have}"
        )


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_torchrun(
    config: dict[str, Any], nproc: int, progress: bool = True, timeout: float | None = None
) -> dict[str, Any]:
    """Run the distillation in ``nproc`` local processes under torchrun; rank 0's result dict.

    The config travels as a JSON file; each rank writes its one-line error to a shared file so the
    parent can raise it as the user's error instead of torchrun's multi-page failure report.
    """
    with tempfile.TemporaryDirectory(prefix="trimformer-ddp-") as scratch:
        folder = Path(scratch)
        (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
        port = free_port()
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1",
            "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", f"trimformer-{os.getpid()}-{port}",
            "--max-restarts", "0",
            "-m", "trimformer.training.distill.worker", str(folder),
        ]  # fmt: skip
        env = dict(os.environ)
        # Each rank gets its share of the cores; torchrun would otherwise force one thread.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["TRIMFORMER_PROGRESS"] = "1" if progress else "0"
        logger.info("launching: %s", " ".join(command))
        # Output passes through: rank 0's progress bar is the user's view of the run.
        process = subprocess.Popen(command, env=env)
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            process.kill()
            process.wait()
            raise UserError(f"the distributed run did not finish within {timeout:.0f} s") from exc
        except KeyboardInterrupt:
            # The ranks got the same Ctrl-C: give them time to write their checkpoint and stop.
            try:
                process.wait(120)
            except (KeyboardInterrupt, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
            raise
        if (folder / ERROR_FILE).is_file():
            raise UserError((folder / ERROR_FILE).read_text(encoding="utf-8").strip())
        if returncode == 130 or returncode < 0:
            raise KeyboardInterrupt
        if returncode != 0 or not (folder / RESULT_FILE).is_file():
            raise RuntimeError(f"torchrun exited with status {returncode}; its messages are above")
        result: dict[str, Any] = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        return result
