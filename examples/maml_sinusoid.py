"""MAML on Finn et al.'s sinusoid regression with `bl.solve`, one process or torchrun DDP.

Meta-learn the initialisation of a 1-40-40-1 ReLU MLP so that a few SGD steps on K=10 points of
a new sinusoid y = a sin(x + p) (a ~ U[0.1, 5], p ~ U[0, pi], x ~ U[-5, 5]) fit it. Second-order
meta-gradients (`bl.Unrolled()`), tasks batched with `torch.func.vmap`.

    python examples/maml_sinusoid.py            # about 20 s on a laptop CPU
    python examples/maml_sinusoid.py --quick    # a few seconds (what the test runs)
    torchrun --nproc-per-node 2 examples/maml_sinusoid.py   # tasks split over 2 processes

Under torchrun the meta-model is wrapped in `DistributedDataParallel` (gloo on CPU, nccl on
GPUs): every rank draws the same meta-batch, adapts to its share of the tasks, and DDP averages
the meta-gradients, which equal one process's on the whole batch to float rounding
(`tests/test_examples.py`). Nothing bilevel-specific is needed: `bl.solve` is a pure function
of the parameters that DDP already tracks.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.distributed as dist
from torch import nn

import bilevel as bl


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def sample_tasks(n: int, shots: int, generator: torch.Generator):
    """n sinusoids: support (x, y) and query (x, y), each (n, shots, 1)."""
    amplitude = 0.1 + 4.9 * torch.rand(n, 1, 1, generator=generator)
    phase = math.pi * torch.rand(n, 1, 1, generator=generator)
    x = -5.0 + 10.0 * torch.rand(n, 2 * shots, 1, generator=generator)
    y = amplitude * torch.sin(x + phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


class MAML(nn.Module):
    """forward(tasks) = mean query MSE after `steps` SGD steps from the module's weights."""

    def __init__(self, net: nn.Module, *, inner_lr: float = 0.01, steps: int = 1, mode=None):
        super().__init__()
        self.net = net
        self.optimizer = bl.sgd(inner_lr)
        self.steps = steps
        self.mode = bl.Unrolled() if mode is None else mode

    def mse(self, params, x, y):
        return ((torch.func.functional_call(self.net, params, (x,)) - y) ** 2).mean()

    def inner_loss(self, params, meta, data):  # meta={}: the outer variable is params0
        return self.mse(params, *data)

    def adapted_query_loss(self, params, xs, ys, xq, yq):
        fast = bl.solve(
            self.inner_loss,
            params,
            {},
            optimizer=self.optimizer,
            steps=self.steps,
            mode=self.mode,
            data=(xs, ys),
        )
        return self.mse(fast, xq, yq)

    def forward(self, xs, ys, xq, yq):
        params = dict(self.net.named_parameters())
        per_task = torch.func.vmap(self.adapted_query_loss, in_dims=(None, 0, 0, 0, 0))
        return per_task(params, xs, ys, xq, yq).mean()


def evaluate(maml: MAML, tasks) -> float:
    """Meta-test query MSE after adaptation (the gradient steps need no outer graph)."""
    params = {k: v.detach() for k, v in maml.net.named_parameters()}
    per_task = torch.func.vmap(maml.adapted_query_loss, in_dims=(None, 0, 0, 0, 0))
    return float(per_task(params, *tasks).mean())


def train(
    *,
    iterations: int,
    meta_batch: int = 25,
    shots: int = 10,
    seed: int = 0,
    inner_lr: float = 0.01,
    steps: int = 1,
    meta_lr: float = 1e-3,
    test_tasks: int = 600,
    log_every: int = 0,
    on_step=None,
) -> dict:
    """Meta-train; under torchrun each rank takes its share of every meta-batch."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if meta_batch % world:
        raise ValueError(f"meta_batch={meta_batch} must be divisible by the {world} processes")
    maml = MAML(make_net(seed), inner_lr=inner_lr, steps=steps)
    model = nn.parallel.DistributedDataParallel(maml) if distributed else maml
    meta_opt = torch.optim.Adam(maml.parameters(), lr=meta_lr)
    generator = torch.Generator().manual_seed(seed + 1)  # the same draws on every rank
    test = sample_tasks(test_tasks, shots, torch.Generator().manual_seed(seed + 2))
    before = evaluate(maml, test)
    for iteration in range(iterations):
        tasks = sample_tasks(meta_batch, shots, generator)
        mine = [t[rank::world] for t in tasks]
        loss = model(*mine)
        meta_opt.zero_grad()
        loss.backward()  # DDP averages the meta-gradient over ranks here
        if on_step is not None:  # e.g. to inspect the meta-gradient
            on_step(maml)
        meta_opt.step()
        if log_every and rank == 0 and (iteration + 1) % log_every == 0:
            print(f"iteration {iteration + 1}: meta-train query MSE {loss.item():.3f}")
    after = evaluate(maml, test)
    return {"before": before, "after": after, "maml": maml}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--iterations", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    iterations = args.iterations or (150 if args.quick else 1000)
    distributed = "LOCAL_RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    try:
        result = train(iterations=iterations, log_every=0 if args.quick else 250)
    finally:
        if distributed:
            dist.destroy_process_group()
    if not distributed or int(os.environ["LOCAL_RANK"]) == 0:
        print(
            f"meta-test query MSE after 1 step on 10 points: {result['after']:.3f} "
            f"(the initialisation before meta-training: {result['before']:.3f})"
        )
    return result


if __name__ == "__main__":
    main()
