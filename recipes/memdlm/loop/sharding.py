"""Wrapping and checkpoints of a torchrun job: FSDP2 sharding, DDP's unused-parameter search,
sharded `torch.distributed.checkpoint` folders and the full weights on rank 0."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recipes.memdlm.backbones import adapter
from recipes.memdlm.loop import checkpoint as ckpt
from recipes.memdlm.loop.parallel import Context

DCP_FOLDER = "checkpoint.dcp"


def shard_model(model: nn.Module, ctx: Context) -> nn.Module:
    """FSDP2: every layer of the Backbone's stack is one unit, the rest (embeddings, head) the
    root.

    Mixed precision on CUDA: bf16 compute, float32 gradient reduction, float32 master weights.
    The split-forward methods are registered so that calling them gathers the root's weights.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    options: dict[str, Any] = {"mesh": mesh}
    if ctx.device.type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    backbone = adapter(model)
    head = backbone.output_head()
    if head is not None:
        # Outside its own call the head's weight is a shard, so the fused loss (which reads
        # lm_head.weight directly) cannot run; a hook on the head makes `method.fused_head`
        # choose the logits path, in training and in evaluation alike.
        head.register_forward_pre_hook(_keep_head_call)
    for layer in backbone.layers():
        fully_shard(layer, **options)
    fully_shard(model, **options)
    for name in backbone.split_methods():
        register_fsdp_forward_method(model, name)
    return model


def _keep_head_call(module, args):
    del module, args  # a no-op: its presence is the signal (see shard_model)


def find_unused(model: nn.Module) -> bool:
    """Hugging Face models may hold weights a step does not use (unrouted MoE experts)."""
    return not adapter(model).uses_every_parameter()


def save_dcp(folder: Path, model, optimizer, extra: dict[str, Any], ctx: Context) -> None:
    """Sharded checkpoint: every rank writes its shards into a temporary folder, then rank 0
    renames it into place, so a crash never leaves a half-written `checkpoint.dcp/` behind."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = folder / DCP_FOLDER, folder / f"{DCP_FOLDER}.tmp"
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if ctx.is_main:
        ckpt.save(tmp / "extra.pt", extra)
        old = folder / f"{DCP_FOLDER}.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_dcp(folder: Path, model, optimizer) -> dict[str, Any]:
    """Load a `save_dcp` checkpoint into sharded `model` and `optimizer` (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    reader = ckpt.dcp_reader(folder / DCP_FOLDER)
    reader.read_metadata()  # a refused or broken file fails here in one line (dcp.load wraps it)
    dcp.load(state, storage_reader=reader)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    return ckpt.load(folder / DCP_FOLDER / "extra.pt", require_model=False)


def full_state_dict(model: nn.Module, ctx: Context) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0 (a collective under FSDP; other ranks get {})."""
    if ctx.strategy != "fsdp":
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
