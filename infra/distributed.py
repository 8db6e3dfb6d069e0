"""Processes: one per GPU under torchrun (NCCL), or one on the CPU (gloo when several). What train.py and
evaluate.py share about them lives here, below both: the process group, sharding and gathering, the compute dtype.

    torchrun --nproc-per-node 4 train.py ...      # WORLD_SIZE=4, RANK / LOCAL_RANK per process
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_distributed() -> Distributed:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: NCCL on GPUs, gloo on the CPU; each rank on its own device."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(device=default_device())
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return Distributed(dist.get_rank(), dist.get_world_size(), device)


def teardown_distributed(run: Distributed) -> None:
    if run.world > 1:
        dist.destroy_process_group()


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 on a CUDA GPU that has it, fp32 on the CPU (where bf16 matmuls may be emulated)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shard(items: list, rank: int, world: int) -> list[tuple[int, object]]:
    """This rank's (index, item) pairs, round-robin; ranks with one item fewer repeat their last one, so every rank
    runs the same number of batches. The gather drops the repeats by index."""
    mine = list(enumerate(items))[rank::world]
    per_rank = -(-len(items) // world)
    return mine + mine[-1:] * (per_rank - len(mine)) if mine else []


def gather(rows: list, run: Distributed) -> list:
    """Every rank's rows, concatenated in rank order, on every rank."""
    if run.world == 1:
        return rows
    everything = [None] * run.world
    dist.all_gather_object(everything, rows)
    return [row for part in everything for row in part]


def all_reduce_mean(value: float, run: Distributed) -> float:
    if run.world == 1:
        return value
    total = torch.tensor([value], device=run.device)
    dist.all_reduce(total)
    return float(total) / run.world


def wrap_ddp(model) -> DistributedDataParallel:
    """DDP over the trainable weights only: the frozen bases (identical on every rank, 4-bit in part) are neither
    broadcast at start nor reduced. Adapters on Qwen3-MoE experts: an expert no token of a rank's micro-batch chose
    gets no gradient there, so DDP must look for unused parameters (a graph walk per step)."""
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    adapted_experts = any(".experts." in name for name, p in model.named_parameters() if p.requires_grad)
    return DistributedDataParallel(model, find_unused_parameters=adapted_experts)
