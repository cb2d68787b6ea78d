"""Multi-process training under `torchrun`: DDP or FSDP2, with the semantics of one process.

`torchrun --nproc-per-node N -m recipes.memdlm train ...` starts N copies of the CLI; the `train`
command then runs `commands.train.train_distributed` with this module's pieces. Each process
owns one device (CUDA + NCCL, or CPU + gloo).

Exactness by design (tested to 1e-5 in float32 against the single-process loop, `loop/phase.py`):

- `train.batch_size` is the GLOBAL batch. Every rank reads the whole data set, draws the same
  global batch and every random draw for it (anchors, pre-anchor masks, fast-weight inits) from
  identically seeded generators, then keeps its own contiguous block of rows (`Context.rows`).
  Padding is that of the global batch, so each row is exactly the row a single process sees.
- The outer loss is token-normalised by the GLOBAL maskable count (known on every rank, since
  every rank holds the global batch): rank r's loss is S_r / N with S_r its rows' weighted CE
  sum. DDP and FSDP average gradients over ranks, so the loss is multiplied by the world size
  before `backward`; the synchronised gradient is then sum_r grad S_r / N, the one-process
  gradient. Gradient clipping and AdamW see identical gradients on every rank.
- Fast weights live per rank (phi is per batch, never a model parameter). Per-sample fast weights
  (`memdlm.per_sample=true`) are row-local, so every row gets the phi it gets in one process.
  Shared fast weights (the reference code's default) are adapted on the rank's rows only, so they
  differ from one process's phi; `distributed.sync_inner=true` all-reduces their inner
  gradients (weighted by each rank's share of the masked tokens), which restores the one-process
  phi exactly. This is what the reference code's `mem_sync_inner` intends (docs/scaling.md).

Checkpoints: DDP writes `checkpoint.pt` from rank 0, atomically, in the single-process format
(so a run can resume with any number of processes); FSDP writes a sharded
`torch.distributed.checkpoint` folder `checkpoint.dcp/` (renamed into place once every rank has
written its shard) that any world size can load. `model.pt` always holds the full weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import bilevel as bl
from recipes.memdlm.config import DistributedConfig
from recipes.memdlm.errors import UserError
from recipes.memdlm.method import step_record

# --------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class Context:
    """This process's place in the job: rank, world size, device and sharding strategy."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    strategy: str = "ddp"  # "ddp", "fsdp", or "none" (one process, no process group)

    @classmethod
    def single(cls, device: torch.device) -> Context:
        """One process: the training phase's collectives are identities."""
        return cls(0, 1, 0, torch.device(device), "none")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` in place over ranks."""
        if self.distributed:
            dist.all_reduce(tensor)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        return broadcast(value) if self.distributed else value

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous block of a global batch of `batch_size` rows."""
        if batch_size % self.world_size:
            raise UserError(
                f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                f"number of processes {self.world_size}"
            )
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def launched() -> bool:
    """True inside a `torchrun` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cfg: DistributedConfig, device: str = "auto") -> Context:
    """Join the job `torchrun` started (env:// rendezvous) and pick this rank's device.

    device: the recipe's `device` setting; "auto" means CUDA when available. CUDA ranks use
    `cuda:LOCAL_RANK` and NCCL, CPU ranks gloo (`cfg.backend` may name either).
    """
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        if name not in os.environ:
            raise UserError(f"environment variable {name} is not set; launch with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise UserError("distributed.backend='nccl' needs CUDA devices; use 'gloo' on CPU")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=target if use_cuda else None)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, target, cfg.strategy)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- inner sync


@dataclass
class InnerSync:
    """The all-reduce of SHARED fast-weight gradients across ranks for one step.

    shares[k]: this rank's fraction of inner step k's loss-masked tokens, n_r^k / N^k. Each rank's
    inner loss is the mean over its own masked tokens, so sum_r shares_r^k * grad_r^k is the
    gradient of the mean over the global batch: every rank then clips and steps identically and
    holds the single-process phi. One flat all-reduce per inner step. norms: receives the
    global norm of each synchronised (raw, unclipped) gradient.
    """

    shares: list[float]
    norms: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, local, draws) -> InnerSync:
        """n_r^k / N^k for each inner step's loss mask (`Draws` of this rank and the global)."""
        return cls(
            [
                float(mine.sum()) / max(1.0, float(whole.sum()))
                for mine, whole in zip(local.targets, draws.targets)
            ]
        )

    def transform(self) -> bl.GradientTransformation:
        """The `bilevel` transform, first in the inner optimizer's chain."""

        def init(params):
            del params  # the state is the inner step index
            return 0

        def update(grads, state, params=None):
            del params
            keys = list(grads)
            flat = torch.cat([grads[k].reshape(-1) for k in keys]) * self.shares[state]
            dist.all_reduce(flat)
            out, offset = {}, 0
            for k in keys:
                n = grads[k].numel()
                out[k] = flat[offset : offset + n].view_as(grads[k])
                offset += n
            self.norms.append(torch.linalg.vector_norm(flat))
            return out, state + 1

        return bl.GradientTransformation(init, update)


# --------------------------------------------------------------------------- one step


class StepModule(nn.Module):
    """DDP needs its forward to run the step: `forward(step)` returns `step(model)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, step):
        return step(self.model)


def share_of(local, draws, ctx: Context) -> float:
    """This rank's fraction of the global batch's maskable tokens (the loop takes 1 in one
    process without asking)."""
    if not ctx.distributed:
        return 1.0
    return int(local.batch.maskable.sum()) / max(1, int(draws.batch.maskable.sum()))


def _inner_metrics(info, *, per_sample: bool, sync: InnerSync | None, ctx: Context):
    """Inner-loop metrics of the global batch where they are exact, else the mean over ranks:
    (losses, gradient norms, largest per-tensor norms), a float64 tensor each, one value per
    inner step.

    Per-sample phi: inner losses add up over rows (sum over ranks), gradient norms are norms of
    row-disjoint tensors (square root of the summed squares). Shared phi with sync: losses are
    weighted by token shares; norms come from the synchronised gradients. Shared phi without sync:
    each rank has its own phi, and the logged values are the mean over ranks.
    """
    losses = info.loss.detach().double()
    per_key = torch.stack(list(info.grad_norms.values())).detach().double()  # (keys, steps)
    if per_sample:
        sq = per_key.square()
        packed = torch.cat([losses, sq.reshape(-1)])
        ctx.all_reduce(packed)
        losses = packed[: len(losses)]
        per_key = packed[len(losses) :].view_as(sq).sqrt()
        return losses, per_key.square().sum(0).sqrt(), per_key.amax(0)
    if sync is not None:
        losses = losses * torch.tensor(sync.shares, dtype=torch.float64, device=losses.device)
        ctx.all_reduce(losses)
        norms = torch.stack(sync.norms).double()
        return losses, norms, torch.full_like(norms, math.nan)
    packed = torch.cat([losses, info.grad_norm.detach().double(), per_key.amax(0)])
    ctx.all_reduce(packed)
    if ctx.distributed:
        packed = packed / ctx.world_size
    return packed.view(3, -1).unbind(0)


def reduce_metrics(step, loss, parts, per_sample, sync, ctx: Context, grad_norm: torch.Tensor):
    """The step's record (loss and the fast-weights-off loss summed over ranks, inner metrics)
    and the global gradient norm as a float: read back from the device in one `.tolist()`."""
    values = [loss.detach().double().reshape(1)]
    if parts.loss_off is not None:
        values.append(parts.loss_off.detach().double().reshape(1))
    packed = torch.cat(values)
    ctx.all_reduce(packed)
    steps = 0
    if parts.info is not None:
        inner = _inner_metrics(parts.info, per_sample=per_sample, sync=sync, ctx=ctx)
        steps = len(inner[0])
        packed = torch.cat([packed, *inner])
    packed = torch.cat([packed, grad_norm.detach().double().reshape(1).to(packed.device)])
    flat = packed.tolist()
    norm = flat.pop()
    off = flat[1] if parts.loss_off is not None else None
    inner = flat[len(flat) - 3 * steps :] if steps else []
    lists = inner[:steps], inner[steps : 2 * steps], inner[2 * steps :]
    return {"step": step, **step_record(flat[0], off, *lists)}, norm


def clip(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient-norm clip; under FSDP the norm is a DTensor over all shards. Returns the
    norm before clipping (a tensor; no read back here)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
