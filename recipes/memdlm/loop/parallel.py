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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import bilevel as bl
from recipes.memdlm.config import DistributedConfig, MemDLMConfig
from recipes.memdlm.data.batches import Batch, BatchSampler
from recipes.memdlm.errors import UserError
from recipes.memdlm.method import (
    Anchor,
    draw_inner,
    memdlm_core,
    sample_anchor,
    standard_loss,
)

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


# --------------------------------------------------------------------------- global draws


@dataclass
class Draws:
    """One batch with every random draw of its training step."""

    batch: Batch
    anchor: Anchor
    inputs: list[torch.Tensor]  # inner-step input masks (MemDLM)
    targets: list[torch.Tensor]  # inner-step loss masks (MemDLM)
    phi0: dict[str, torch.Tensor] | None  # fast weights before the inner loop (MemDLM)
    teachers: list[torch.Tensor | None] = field(default_factory=list)  # look-ahead masks
    outer: torch.Tensor | None = None  # the leak-free control's outer positions (MemDLM)
    extra_anchors: list[Anchor] = field(default_factory=list)  # Standard with anchors > 1


def draw_global(
    sampler: BatchSampler,
    generators: dict[str, torch.Generator],
    *,
    model,
    mem,
    memdlm: MemDLMConfig,
    mask_id: int,
    time_eps: float,
    device: torch.device,
    anchors: int = 1,
) -> Draws:
    """The global batch and its draws, in the order of the one-process step (`method.step`,
    `method.memdlm_step`): batch, anchor; then pre-anchor masks and phi_0 (and the leak-free
    control's outer positions) from the inner stream (`method.draw_inner`). Standard with
    `anchors` > 1: the first anchor from the anchor stream, as every method's, the others from
    the inner stream, which Standard does not otherwise use.
    """
    batch = sampler.next().to(device)
    anchor = sample_anchor(batch, mask_id=mask_id, eps=time_eps, generator=generators["anchor"])
    if mem is None:
        extra = [
            sample_anchor(batch, mask_id=mask_id, eps=time_eps, generator=generators["inner"])
            for _ in range(anchors - 1)
        ]
        return Draws(batch, anchor, [], [], None, extra_anchors=extra)
    inner = draw_inner(model, mem, batch, anchor, memdlm, generators["inner"])
    return Draws(
        batch, anchor, inner.inputs, inner.targets, inner.phi0, inner.teachers, inner.outer
    )


def take_rows(draws: Draws, rows: slice, *, per_sample: bool) -> Draws:
    """The rows of `draws` that belong to one rank. Tensors that are one object stay one object
    (the MemDLM step recognises the anchor mask among the inner inputs by identity)."""
    cut: dict[int, torch.Tensor] = {}

    def rows_of(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in cut:
            cut[id(tensor)] = tensor[rows]
        return cut[id(tensor)]

    def anchor_rows(a: Anchor) -> Anchor:
        return Anchor(rows_of(a.t), rows_of(a.mask), rows_of(a.xt))

    b = draws.batch
    batch = Batch(rows_of(b.x0), rows_of(b.maskable), rows_of(b.prompt_lengths))
    anchor = anchor_rows(draws.anchor)
    phi0 = draws.phi0
    if phi0 is not None and per_sample:
        phi0 = {k: rows_of(v) for k, v in phi0.items()}
    return Draws(
        batch,
        anchor,
        [rows_of(m) for m in draws.inputs],
        [rows_of(m) for m in draws.targets],
        phi0,
        [None if m is None else rows_of(m) for m in draws.teachers],
        None if draws.outer is None else rows_of(draws.outer),
        [anchor_rows(a) for a in draws.extra_anchors],
    )


# --------------------------------------------------------------------------- inner sync


def inner_grad_sync(shares: list[float], record: list[torch.Tensor] | None = None):
    """A `bilevel` transform that all-reduces SHARED fast-weight gradients across ranks.

    shares[k]: this rank's fraction of inner step k's loss-masked tokens, n_r^k / N^k. Each rank's
    inner loss is the mean over its own masked tokens, so sum_r shares_r^k * grad_r^k is the
    gradient of the mean over the global batch: every rank then clips and steps identically and
    holds the single-process phi. One flat all-reduce per inner step. record: if given, receives
    the global norm of each synchronised (raw, unclipped) gradient.
    """

    def init(params):
        del params  # the state is the inner step index
        return 0

    def update(grads, state, params=None):
        del params
        keys = list(grads)
        flat = torch.cat([grads[k].reshape(-1) for k in keys]) * shares[state]
        dist.all_reduce(flat)
        out, offset = {}, 0
        for k in keys:
            n = grads[k].numel()
            out[k] = flat[offset : offset + n].view_as(grads[k])
            offset += n
        if record is not None:
            record.append(torch.linalg.vector_norm(flat))
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


def local_step(model, mem, local: Draws, *, n_global: int, memdlm, mask_id, log_gap, options):
    """Loss S_r / N of this rank's rows (differentiable) and the raw parts of its metrics."""
    n_local = int(local.batch.maskable.sum())
    share = n_local / max(1, n_global)  # token loss over N_r -> over the global N
    compiled = options.get("compiled")
    if mem is None:  # with extra anchors: the mean of the standard loss over all of them
        loss_fn = compiled["standard"] if compiled is not None else standard_loss
        anchors = [local.anchor, *local.extra_anchors]
        loss = loss_fn(model, local.batch, anchors[0], options["loss_backend"])
        for anchor in anchors[1:]:
            loss = loss + loss_fn(model, local.batch, anchor, options["loss_backend"])
        return loss * (share / len(anchors)), {}
    core = compiled["memdlm"] if compiled is not None else memdlm_core
    loss, off, info = core(
        model,
        mem,
        local.batch,
        local.anchor,
        local.inputs,
        local.targets,
        local.phi0,
        memdlm,
        mask_id,
        log_gap,
        options["loss_backend"],
        grad_sync=options.get("grad_sync"),
        teachers=local.teachers,
        outer=local.outer,
    )
    parts = {"info": info}
    if off is not None:
        parts["loss_off"] = off * share
    return loss * share, parts


def _inner_metrics(parts, *, per_sample: bool, sync: dict | None, ctx: Context) -> dict:
    """Inner-loop metrics of the global batch where they are exact, else the mean over ranks.

    Per-sample phi: inner losses add up over rows (sum over ranks), gradient norms are norms of
    row-disjoint tensors (square root of the summed squares). Shared phi with sync: losses are
    weighted by token shares; norms come from the synchronised gradients. Shared phi without sync:
    each rank has its own phi, and the logged values are the mean over ranks.
    """
    info = parts["info"]
    losses = info["loss"].detach().double()
    per_key = torch.stack(list(info["grad_norms"].values())).double()  # (keys, steps)
    if per_sample:
        sq = per_key.square()
        packed = torch.cat([losses, sq.reshape(-1)])
        ctx.all_reduce(packed)
        losses = packed[: len(losses)]
        per_key = packed[len(losses) :].view_as(sq).sqrt()
        norms = per_key.square().sum(0).sqrt()
    elif sync is not None:
        losses = losses * torch.tensor(sync["shares"], dtype=torch.float64, device=losses.device)
        ctx.all_reduce(losses)
        norms = torch.stack(sync["record"]).double()
        per_key = None
    else:
        packed = torch.cat([losses, info["grad_norm"].detach().double(), per_key.amax(0)])
        ctx.all_reduce(packed)
        packed = packed / ctx.world_size
        k = len(losses)
        losses, norms, largest = packed[:k], packed[k : 2 * k], packed[2 * k :]
        return _inner_record(losses, norms, largest)
    largest = per_key.amax(0) if per_key is not None else torch.full_like(norms, math.nan)
    return _inner_record(losses, norms, largest)


def _inner_record(losses, norms, largest) -> dict[str, float]:
    record = {}
    for k, (value, norm, big) in enumerate(zip(losses.tolist(), norms.tolist(), largest.tolist())):
        record[f"inner_loss_{k + 1}"] = value
        record[f"inner_grad_norm_{k + 1}"] = norm
        if math.isfinite(big):
            record[f"inner_max_tensor_norm_{k + 1}"] = big
    return record


def sync_shares(local: Draws, draws: Draws) -> list[float]:
    """n_r^k / N^k for each inner step's loss mask."""
    return [
        float(mine.sum()) / max(1.0, float(whole.sum()))
        for mine, whole in zip(local.targets, draws.targets)
    ]


def reduce_metrics(step, loss, parts, per_sample, sync, ctx: Context) -> dict[str, Any]:
    """The step's record: loss (and the fast-weights-off loss) summed over ranks, inner metrics."""
    values = [loss.detach().double().reshape(())]
    if "loss_off" in parts:
        values.append(parts["loss_off"].detach().double().reshape(()))
    packed = torch.stack(values)
    ctx.all_reduce(packed)
    record: dict[str, Any] = {"step": step, "loss": float(packed[0])}
    if "info" in parts:
        record.update(_inner_metrics(parts, per_sample=per_sample, sync=sync, ctx=ctx))
    if any(not math.isfinite(v) for k, v in record.items() if k.startswith("inner_loss_")):
        record["inner_nonfinite"] = True  # as `method.step.step_metrics`: the step is skipped
        record["loss"] = math.nan
    if len(values) > 1:
        record["loss_off"] = float(packed[1])
        record["gap"] = record["loss_off"] - record["loss"]
    return record


def clip(model: nn.Module, max_norm: float) -> float:
    """Global gradient-norm clip; under FSDP the norm is a DTensor over all shards."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
