"""Distributed setup and ``parallelize``: one function that turns the plain model into a training model.

The same entry point runs under ``python`` (one process) and under
``torchrun`` (N processes on one or many nodes): ``init_distributed`` reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` that torchrun sets, picks NCCL on CUDA
and gloo on CPU, and returns a ``DistInfo``.

``parallelize`` applies, from outside and in this order (torchtitan's order):

1. activation checkpointing, one wrapper per ``Block`` (recompute the block in
   backward instead of keeping its activations);
2. ``torch.compile`` per block, in place (``Module.compile`` keeps parameter
   names, so checkpoints never see ``_orig_mod.``);
3. data parallelism: DDP, or FSDP2 ``fully_shard`` per block and then the
   root. ``fsdp`` keeps parameters gathered between forward and backward
   (``reshard_after_forward=False``): gradients and optimizer state are
   sharded, parameters are not freed mid-step - the ZeRO-2 equivalent, as in
   the report. ``fsdp-zero3`` reshards after forward (ZeRO-3: parameters
   sharded too, one more all-gather in backward).

Compile goes inside the wrappers so each compiled graph is one block, and
FSDP goes last so its hooks see the final module tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from phibook.errors import PhibookError
from phibook.inference.kernels import kernel_ok

DISTRIBUTED_MODES = ("ddp", "fsdp", "fsdp-zero3")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise PhibookError(f"environment variable {name}={value!r} is not an integer") from exc


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when torchrun launched us (WORLD_SIZE > 1); pick the device.

    device: "auto" (cuda:LOCAL_RANK when CUDA is present, else cpu), "cpu", or "cuda".
    """
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    if device not in ("auto", "cpu", "cuda"):
        raise PhibookError(f"device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise PhibookError("device=cuda was asked for but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30), **kwargs)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (in place on a copy)."""
    if not info.distributed:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (the list is valid on every rank)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def parallelize(
    model: nn.Module,
    info: DistInfo,
    *,
    activation_checkpointing: bool = False,
    compile: bool = False,
    distributed: str = "ddp",
) -> nn.Module:
    """Return the module to train: ``model`` with AC, compile and DDP/FSDP2 applied (see module doc).

    The returned object may be ``model`` itself (FSDP2 and compile work in
    place) or a DDP wrapper around it. Parameter names stay those of
    ``PhiModel`` as far as ``torch.distributed.checkpoint.state_dict`` sees them.
    """
    if distributed not in DISTRIBUTED_MODES:
        raise PhibookError(f"distributed must be one of {', '.join(DISTRIBUTED_MODES)}, got {distributed!r}")
    blocks = model.blocks
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        # The wrapper strips its own prefix from state_dict keys, so saved
        # names stay "blocks.{i}.attn...".
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)
    # On the CPU, inductor's generated C++ is a kernel like any other: used once proven on this
    # CPU (phibook.inference.kernels; a refusal prints one line and the blocks train eagerly).
    if compile and (info.device.type != "cpu" or kernel_ok("inductor")):
        for block in blocks:
            block.compile()
    if not info.distributed:
        return model
    if distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        # The only buffers are the rotary tables, identical on every rank: nothing to broadcast.
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    import warnings

    from torch.distributed.fsdp import fully_shard

    # Our forward returns the LM head's output, which autograd sees as a view; we
    # never modify it in place, so FSDP2's warning about in-place ops does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    reshard = distributed == "fsdp-zero3"
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard)
    # The root holds embed, ln_f and lm_head; its parameters are needed right
    # after forward for backward anyway, so never reshard them in between.
    fully_shard(model, reshard_after_forward=False)
    return model


def unwrap(module: nn.Module) -> nn.Module:
    """The PhiModel inside a DDP wrapper (FSDP2 and compile work in place)."""
    return module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module


def set_grad_sync(module: nn.Module, enabled: bool) -> None:
    """Skip (or resume) the gradient all-reduce/reduce-scatter between accumulation micro-steps."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(enabled)
    elif hasattr(module, "require_backward_grad_sync"):  # DDP: what no_sync() toggles
        module.require_backward_grad_sync = enabled
