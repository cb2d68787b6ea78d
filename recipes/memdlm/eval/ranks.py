"""The `memdlm` lm-eval model across N processes: lm-eval's data-parallel mode.

Launched by `torchrun --nproc-per-node N -m recipes.memdlm harness ...` or by
`accelerate launch --multi_gpu --num_processes N -m recipes.memdlm harness ...` (both set RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address), each process loads the model on its own
device (`cuda:LOCAL_RANK` with NCCL, or the CPU with gloo, `loop/parallel.py`) and reports its
rank and the world size to lm-eval. lm-eval (`evaluator.evaluate`) then gives rank r the
documents r, r + N, r + 2N, ... of every task (`Task.build_all_requests(rank=, world_size=)`),
pads the shorter ranks with copies of their last request so that all ranks run as many, and
gathers the per-document metrics on rank 0 (`gather_object`), which alone aggregates and writes
the results. lm-eval's own `HFLM` (models/huggingface.py) does the same under accelerate; its
collectives are accelerate's, these are `torch.distributed`'s.

Exactness: a request's random numbers come from its own tokens (`harness_setup.request_seed`),
so each document's score does not depend on the process that runs it; and the gathered
per-document metrics (and logged samples) are put back in document order (`in_document_order`),
so that aggregates that depend on the order (float sums, bootstrap standard errors) are one
process's bit for bit, and so is the samples file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from recipes.memdlm.config import DistributedConfig
from recipes.memdlm.eval.harness_setup import pick_device
from recipes.memdlm.loop import parallel


@dataclass(frozen=True)
class Ranks:
    """This process's place among the evaluation's processes."""

    rank: int = 0
    world_size: int = 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` concatenated along dim 0 in rank order (a 0-d tensor counts as
        one element), as lm-eval's `LM.all_gather` (accelerate's `gather`)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """[obj of rank 0, obj of rank 1, ...] on rank `dst`, None on the others."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return None if gathered is None else in_document_order(gathered)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def in_document_order(parts: list[Any]) -> list[Any]:
    """What lm-eval gathers from the ranks, arranged so that its concatenation in rank order
    (`itertools.chain` over the parts) is the one-process list of documents 0, 1, 2, ...

    Rank r holds documents r, r + N, ... in order. parts[r] is either rank r's metrics,
    `{task: {(metric, filter): [one value per document]}}`, or its logged samples,
    `{task: [one sample per filter and document, filter by filter]}`. Returned: the merged
    object (values round-robin over the ranks) first, then empty ones. Parts of another shape,
    or whose lengths are not one per document, are returned as they came.
    """
    if len({frozenset(p) for p in parts if isinstance(p, dict)}) != 1 or len(parts) < 2:
        return parts
    if all(_is_table(p, dict) for p in parts):
        # a rank without documents of a task has no entries for it: none is an empty list
        keys = {task: list(dict.fromkeys(k for p in parts for k in p[task])) for task in parts[0]}
        out = {
            task: {k: _round_robin([p[task].get(k, []) for p in parts]) for k in names}
            for task, names in keys.items()
        }
        if any(v is None for table in out.values() for v in table.values()):
            return parts
        empty = {task: {k: [] for k in names} for task, names in keys.items()}
        return [out] + [empty] * (len(parts) - 1)
    if all(_is_table(p, list) for p in parts):
        out = {task: _samples_in_order([p[task] for p in parts]) for task in parts[0]}
        if any(v is None for v in out.values()):
            return parts
        return [out] + [{task: [] for task in out}] * (len(parts) - 1)
    return parts


def _is_table(part: Any, kind: type) -> bool:
    return isinstance(part, dict) and all(isinstance(v, kind) for v in part.values())


def _round_robin(lists: list[list]) -> list | None:
    """lists[r]: documents r, r + N, ... of N ranks; their items in document order, or None
    when the lengths do not fit that split."""
    if not all(isinstance(items, list) for items in lists):
        return None
    n, total = len(lists), sum(len(items) for items in lists)
    if [len(items) for items in lists] != [len(range(r, total, n)) for r in range(n)]:
        return None
    return [lists[i % n][i // n] for i in range(total)]


def _samples_in_order(lists: list[list]) -> list | None:
    """Each rank's samples (filter by filter, documents in order) merged filter by filter."""
    filters: dict[Any, None] = {}
    for items in lists:
        if not all(isinstance(item, dict) and "filter" in item for item in items):
            return None
        filters.update(dict.fromkeys(item["filter"] for item in items))
    out = []
    for name in filters:
        merged = _round_robin([[i for i in items if i["filter"] == name] for items in lists])
        if merged is None:
            return None
        out += merged
    return out


def launched() -> bool:
    """True inside a torchrun / accelerate launch job of more than one process."""
    return parallel.launched()


def process_device(name: str | None) -> torch.device:
    """This process's device for the model arg `device`: `harness_setup.pick_device`'s, with a
    CUDA device moved to `cuda:LOCAL_RANK` when launched (lm-eval's CLI asks every process for
    cuda:0; each process takes its own GPU, as `HFLM` does under accelerate)."""
    device = pick_device(name)
    if launched() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if launched() and device.type != "cpu":
        raise ValueError(
            f"memdlm across processes runs on CUDA or the CPU, not on device {str(device)!r}"
        )
    return device


def join(device: torch.device) -> Ranks:
    """One process (`Ranks()`) unless launched; then this process's rank in the job's process
    group, joined here if nobody has (env:// rendezvous; NCCL for CUDA, gloo for the CPU)."""
    if not launched():
        return Ranks()
    ctx = parallel.init(DistributedConfig(), device="cuda" if device.type == "cuda" else "cpu")
    return Ranks(ctx.rank, ctx.world_size)


def leave() -> None:
    """Destroy the process group at the end of the command (no-op without one)."""
    parallel.shutdown()
