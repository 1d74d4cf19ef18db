"""How a producer run executes: its process group (torchrun), device, precision and checkpoints.

* Processes: ``torchrun --nproc-per-node N [--nnodes ...] --no-python das train ...`` sets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous variables); :func:`init_world` reads them and, when
  ``WORLD_SIZE > 1``, joins the process group: gloo on CPU, NCCL on CUDA. Without torchrun a run is one
  process of a world of one, and nothing distributed is initialised.
* Device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``; under torchrun on CUDA each process uses
  ``cuda:LOCAL_RANK``.
* Precision: ``fp32``; ``bf16`` (autocast; CPU and CUDA); ``fp16`` (autocast with a GradScaler; CUDA
  only). Trainable parts stay in fp32 (autocast runs the matmuls in the low precision).
* Checkpoints: one file, ``<dir>/last.pt``, written atomically by rank 0; every rank reads it on resume.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FILE = "last.pt"


class RunError(ValueError):
    """A run's settings cannot work (fp16 on CPU, a global batch that does not divide, a checkpoint of
    another run...): the message says why."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env() -> World:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (a world of one without them)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def resolve_run_device(name: str = "auto", world: World | None = None) -> torch.device:
    world = world or world_from_env()
    if name not in DEVICES and not name.startswith("cuda:"):
        raise RunError(f"unknown device {name!r} (use {', '.join(DEVICES)})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RunError(f"device {name!r} requested but CUDA is not available on this machine")
        if name == "cuda":
            name = f"cuda:{world.local_rank}"
        torch.cuda.set_device(torch.device(name))
    return torch.device(name)


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise RunError(f"unknown precision {precision!r} (use {', '.join(PRECISIONS)})")
    if precision == "fp16" and device.type != "cuda":
        raise RunError("--precision fp16 needs a CUDA device (float16 autocast is CUDA-only here); "
                       "on CPU use --precision bf16 or fp32")


def init_world(device: torch.device) -> World:
    """Join torchrun's process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA); idempotent."""
    world = world_from_env()
    if world.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                **({"device_id": device} if device.type == "cuda" else {}))
    return world


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device, precision: str):
    """The forward pass's context for ``precision`` (nothing for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    check_precision(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """DistributedDataParallel over ``module`` when distributed (gradients averaged over the ranks).
    Unused parameters are allowed: the search runs a different subset of its adapters each step."""
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel  # only distributed runs need it

    return DistributedDataParallel(module, find_unused_parameters=True)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict[str, Any], world: World) -> Path | None:
    """Rank 0 writes ``state`` to ``<directory>/last.pt`` atomically (temporary file, then rename)."""
    path = Path(directory) / CHECKPOINT_FILE
    if world.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, staging)
        os.replace(staging, path)
    return path


def load_checkpoint(directory: str | Path, device: torch.device) -> dict[str, Any] | None:
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location=device, weights_only=False)


def check_resumable(saved: dict[str, Any], expected: dict[str, Any], where: str | Path) -> None:
    """Refuse to resume a checkpoint of a run with other settings (it would not end where that run would)."""
    different = {k: (saved.get("run", {}).get(k), v) for k, v in expected.items() if saved.get("run", {}).get(k) != v}
    if different:
        detail = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in different.items())
        raise RunError(f"the checkpoint in {where} is of another run ({detail}); remove it or run without --resume")
