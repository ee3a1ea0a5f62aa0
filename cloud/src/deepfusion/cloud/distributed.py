"""The trainer across processes: `torchrun --nproc-per-node N -m deepfusion.cloud.cli train ...`.

    ranks = Ranks.from_env()        # one process: Ranks(0, 1), and every call below is a no-op
    mine = ranks.share(clusters)    # phase II: students are independent jobs, one per rank in turn
    batch = ranks.slice(batch)      # phase III: each rank takes its rows of the same global batch

Phase II needs no communication beyond a barrier (the students meet in the object store). Phase III
wraps the MoE in FSDP (`fully_shard`, per decoder layer and at the root): parameters, gradients and
optimizer state are sharded, gradients are averaged over ranks, and every rank draws the same global
batch and trains on its share of it, so N processes follow the single-process run. gloo on CPU, NCCL
when every rank has a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

from deepfusion.cloud.data import Batch

__all__ = ["Ranks"]

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: torch.device | None = None) -> Ranks:
        """The process group torchrun describes in the environment (joined here); else one process.

        NCCL when the ranks train on GPUs, gloo otherwise: NCCL cannot reduce the CPU tensors of a
        `--device cpu` run on a machine that has GPUs. Without `device`, GPUs are used when present.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if on_gpu else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def close(self) -> None:
        """Leave the process group (torchrun's processes should before they exit) once every rank is done
        with it: a rank that tore it down while rank 0 still gathered the last state aborted (gloo:
        "terminate called without an active exception")."""
        if self.world > 1 and dist.is_initialized():
            try:
                dist.barrier()
            finally:
                dist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's items of a list every rank holds in the same order (round robin)."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, in rank order (picklable objects between trusted ranks only)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def from_main(self, value: T) -> T:
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box: list[Any] = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        # NCCL reduces GPU tensors only ("No backend type associated with device type cpu"): there
        # the value goes through this rank's GPU, which `resolve_device` made the current one.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world

    def shard_model(self, model: torch.nn.Module, layers: list[torch.nn.Module]) -> None:
        """FSDP: each of `layers` its own unit, the rest at the root; no-op in one process."""
        if self.world == 1:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in layers:
            fully_shard(layer)
        fully_shard(model)

    def full_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The unsharded state dict, on CPU (complete on rank 0 only when sharded)."""
        if self.world == 1:
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return cast(dict[str, torch.Tensor], get_model_state_dict(model, options=options))

    def slice(self, batch: Batch) -> Batch:
        """This rank's sequences of a global batch (rows renumbered to the slice); none when the batch
        has fewer sequences than there are ranks."""
        if self.world == 1:
            return batch
        keep = list(range(self.rank, batch.input_ids.size(0), self.world))
        position = {seq: i for i, seq in enumerate(keep)}
        rows = [replace(row, seq=position[row.seq]) for row in batch.rows if row.seq in position]
        index = torch.tensor(keep, dtype=torch.long)  # an empty list would make a float tensor, no index
        return Batch(batch.input_ids[index], batch.attention_mask[index], batch.lengths[index], rows)
