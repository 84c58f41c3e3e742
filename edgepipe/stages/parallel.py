"""Where a training stage runs: one process, or one of N launched by torchrun or ``accelerate launch``.

Both launchers hand each process the same environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT`` (a single process has none of them). Each process trains on the GPU of its ``LOCAL_RANK``
where CUDA is present (NCCL between processes), on the CPU otherwise (gloo); ``CUDA_VISIBLE_DEVICES=""`` keeps a
GPU machine on the CPU. Rank 0 alone writes files and draws progress; what it read from disk (a checkpoint, cached
teacher targets) reaches the other ranks through the process group, so nodes need no shared filesystem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from edgepipe.errors import UsageError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank, world size, local rank and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints and the cache entry and shows progress."""
        return self.rank == 0

    def from_main(self, value):
        """Rank 0's ``value`` (any picklable object, e.g. a step or an optimizer state), on every rank."""
        if self.world == 1:
            return value
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm)
        return box[0]

    def arrays_from_main(self, arrays: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """Rank 0's ``arrays``, copied to every rank tensor by tensor (no pickling of large data)."""
        if self.world == 1:
            return arrays
        shapes = self.from_main({k: (v.shape, v.dtype.str) for k, v in arrays.items()} if self.main else None)
        out = {}
        for key, (shape, dtype) in shapes.items():
            host = arrays[key] if self.main else np.empty(shape, np.dtype(dtype))
            t = torch.from_numpy(np.ascontiguousarray(host)).to(self._comm)
            dist.broadcast(t, src=0)
            out[key] = t.cpu().numpy()
        return out

    def sum_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Element-wise sums over ranks, in place: rows each rank filled alone (zeros elsewhere) become whole."""
        if self.world == 1:
            return arrays
        for value in arrays.values():
            t = torch.from_numpy(value).to(self._comm)
            dist.all_reduce(t)
            value[...] = t.cpu().numpy()
        return arrays

    @property
    def _comm(self) -> torch.device:
        """Where collectives take their tensors: NCCL needs them on the GPU, gloo on the CPU."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


SINGLE = Ranks()


def launched_world() -> int:
    """The world size the launcher asked for (1 outside torchrun / accelerate launch); imports nothing heavy."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 outside a launcher)."""
    return int(os.environ.get("RANK", "0"))


def train_device(local_rank: int = 0) -> torch.device:
    """The GPU of ``local_rank`` where CUDA is present, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init() -> Ranks:
    """This process's ``Ranks``, joining the process group (NCCL on GPUs, gloo on CPUs) when launched as N > 1.

    Raises:
        UsageError: The launcher's environment is incomplete, or asks for more GPUs per node than this node has.
    """
    world = launched_world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = train_device(local_rank)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(
                f"LOCAL_RANK {local_rank} but this node has {count} GPU(s).",
                hint=f"Launch at most {count} processes per node (torchrun --nproc_per_node={count}).",
            )
        torch.cuda.set_device(device)
    if world == 1:
        return Ranks(device=device)
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} is not.",
            hint="Launch with torchrun or accelerate launch, which set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.",
        )
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group (once training is done), so the launcher sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: Ampere+ GPUs; CPUs with AVX512-BF16 or AMX (oneDNN's check:
    elsewhere bf16 is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
