"""Several processes, one training run (DDP): the launch command, who is rank 0, and the CPU opt-in.

A trainer with ``num_processes: N`` runs as N ranks started by ``torchrun`` (:func:`launch_command`):
gloo on CPU, NCCL on GPU. Every rank must opt into the CPU explicitly when there is no GPU
(``TrainingArguments(use_cpu=True, ddp_backend="gloo")``, see :func:`ddp_backend`): without it
accelerate finds no device to distribute over and each rank silently trains alone on all the data.

Rank 0 is the only one that reports over Dagster Pipes, logs to MLflow, saves and writes
``result.json``; the others train and return. Torch is imported inside the functions.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence


def world_size() -> int:
    """Processes in this run (``WORLD_SIZE``, set by torchrun; 1 when started alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (``RANK``, set by torchrun; 0 when started alone)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0: the process that reports, logs, saves and writes the result."""
    return rank() == 0


def launch_command(python: str, module: str, args: Sequence[str], num_processes: int,
                   accelerate_config: Optional[str] = None) -> list[str]:
    """The command that runs ``python -m module *args`` as ``num_processes`` ranks on this machine.

    One process: the module itself. Several: ``torchrun --standalone`` (a free rendezvous port on
    loopback, so concurrent launches never collide), which sets RANK, WORLD_SIZE and LOCAL_RANK. With an
    ``accelerate_config`` file (FSDP, :func:`tuneline.train.engines.accelerate_config`): ``accelerate launch``
    with it, which also sets those and tells the HF Trainer which engine to use.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if accelerate_config is not None:
        return [python, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                "--num_processes", str(num_processes), "--module", module, *args]
    if num_processes == 1:
        return [python, "-m", module, *args]
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(num_processes), "--module", module, *args]


def check_world(num_processes: int, module: str) -> None:
    """Fail before training when the recipe's ``num_processes`` is not the world this process runs in."""
    world = world_size()
    if num_processes != world:
        raise ValueError(
            f"num_processes={num_processes} but this process runs in a world of {world}: launch it with "
            f"`torchrun --standalone --nproc-per-node {num_processes} --module {module} ...` "
            "(the launcher resource does this)"
        )


def ddp_backend() -> Optional[str]:
    """``ddp_backend`` for TrainingArguments: "gloo" for several ranks without CUDA (with ``use_cpu=True``, the
    CPU opt-in every rank needs); None alone (a backend there makes accelerate look for a process group) or
    with CUDA (accelerate picks NCCL)."""
    import torch

    return "gloo" if world_size() > 1 and not torch.cuda.is_available() else None


def init_process_group() -> bool:
    """Join the process group now (before any TrainingArguments exists) when this is one rank of several.

    Returns whether a group is initialized. The Trainer reuses the group. Needed where ranks must wait
    for rank 0 before the trainer is built (:func:`main_process_first`).
    """
    import torch.distributed as dist

    if world_size() == 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend=ddp_backend() or "nccl")
    return True


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (a merge, a cache fill); the others run it after, finding its output."""
    import torch.distributed as dist

    if not init_process_group():
        yield
        return
    if not is_main_process():
        dist.barrier()
    try:
        yield
    finally:
        if is_main_process():
            dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a decision only rank 0 can make, such as an Optuna prune)."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return flag
    box = [bool(flag)]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def gather_counts(count: int) -> list[int]:
    """Every rank's ``count``, in rank order (``[count]`` when alone)."""
    import torch.distributed as dist

    if world_size() == 1 or not dist.is_initialized():
        return [int(count)]
    counts: list[int] = [0] * dist.get_world_size()
    dist.all_gather_object(counts, int(count))
    return [int(c) for c in counts]
