"""Distributed setup, kept apart from the model (as torchtitan's parallelize.py): torchrun's environment ->
process group -> compile -> DDP or FSDP2. The model code holds no distributed code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK; joins the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, device)


def parallelize(model: nn.Module, d: Dist, strategy: str = "ddp", compile: bool = False, bf16: bool = False) -> nn.Module:
    """Compile each encoder block (before wrapping, so the compiled graphs see plain modules), then wrap.

    ddp: gradients all-reduced; unused task heads are expected, since one step trains one task.
    fsdp: FSDP2 `fully_shard` per encoder block, per adapter and head (evaluation calls those directly, not
    through the root's forward), for the backbone's own norm, and at the root; parameters sharded across ranks,
    with bf16 compute and fp32 reductions on GPU.
    """
    if compile:
        for block in model.backbone.blocks:
            block.compile()
    if d.world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for unit in [*model.backbone.blocks, model.backbone, *model.adapters.values(), *model.heads.values()]:
            fully_shard(unit, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, find_unused_parameters=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when `flag` is True on any (one all-reduce): a decision every rank must share."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
