"""Cost of ``bl.solve(mode=bl.Implicit(...))`` against a hand-written loop and TorchOpt (issue 26).

Workload (data hyper-cleaning, the shape of examples/hyper_cleaning.py, float32): a linear
classifier 64 -> 10 on 600 training examples, one learned weight sigma(lambda_i) per example
(the outer variables), inner loss mean_i sigma(lambda_i) CE_i + 1e-2/2 ||W||^2, 100 steps of SGD
(lr 1, momentum 0.9) from a warm start, outer loss: cross-entropy on 300 validation examples;
the hypergradient by CG (tol 1e-4 relative, at most 50 iterations) on Hessian-vector products.

  * bilevel Implicit: ``bl.solve(..., mode=bl.Implicit(bl.CG(...)))``, then ``backward``;
  * by hand: the loop one would write (``torch.autograd.grad``, momentum SGD under
    ``no_grad``) and the implicit gradient by hand: CG on double-backward HVPs and one mixed VJP;
  * torchopt: ``torchopt.diff.implicit.custom_root`` with ``solve_cg`` around the same loop
    (skipped when torchopt is not installed).

Times are the CPU time of the one thread that runs (``time.thread_time``), medians of
round-robin repeats, so that other jobs on a shared machine disturb them less than wall time.
Two timings: the inner solve alone (what ``bl.solve`` adds per step) and the full outer step
(solve + validation loss + hypergradient). All three hypergradients are checked to agree first.

    OMP_NUM_THREADS=1 python benchmarks/bench_bilevel_implicit.py [--repeats 30]
    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_bilevel_implicit.py --benchmark-only
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import bilevel as bl

STEPS, LR, MOMENTUM, REG = 100, 1.0, 0.9, 1e-2
CG_TOL, CG_MAXITER = 1e-4, 50


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 10, generator=g)
    X = torch.rand(900, 64, generator=g)
    y = (X @ teacher + 0.5 * torch.randn(900, 10, generator=g)).argmax(1)
    noisy = torch.where(
        torch.rand(600, generator=g) < 0.5, torch.randint(0, 10, (600,), generator=g), y[:600]
    )
    train, val = (X[:600], noisy), (X[600:], y[600:])
    lam = torch.randn(600, generator=g) * 0.5
    params0 = {"W": torch.randn(64, 10, generator=g) * 0.1, "b": torch.zeros(10)}  # warm start
    return train, val, lam, params0


def inner(params, lam, data):
    X, y = data
    ce = F.cross_entropy(X @ params["W"] + params["b"], y, reduction="none")
    return (torch.sigmoid(lam) * ce).mean() + 0.5 * REG * (params["W"] ** 2).sum()


def outer(params, data):
    X, y = data
    return F.cross_entropy(X @ params["W"] + params["b"], y)


MODE = bl.Implicit(bl.CG(maxiter=CG_MAXITER, tol=CG_TOL), stationarity_rtol=1.0)
OPTIMIZER = bl.sgd(LR, momentum=MOMENTUM)


def bilevel_solve(train, lam, params0):
    return bl.solve(inner, params0, lam, optimizer=OPTIMIZER, steps=STEPS, mode=MODE, data=train)


def bilevel_step(train, val, lam, params0):
    lam = lam.detach().requires_grad_()
    outer(bilevel_solve(train, lam, params0), val).backward()
    return lam.grad


def hand_solve(train, lam, params0):
    lam = lam.detach()
    params, buffers = dict(params0), None
    for _ in range(STEPS):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():  # torchopt's custom_root runs its solver under no_grad
            grads = torch.autograd.grad(inner(leaves, lam, train), list(leaves.values()))
        with torch.no_grad():
            if buffers is None:
                buffers = [g.clone() for g in grads]
            else:
                buffers = [MOMENTUM * b + g for b, g in zip(buffers, grads)]
            params = {k: v - LR * b for (k, v), b in zip(leaves.items(), buffers)}
    return params


def hand_cg(hvp, b):
    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), r @ r
    threshold = (CG_TOL**2) * rs
    for _ in range(CG_MAXITER):
        if rs <= threshold:
            break
        Ap = hvp(p)
        alpha = rs / (p @ Ap)
        x, r = x + alpha * p, r - alpha * Ap
        rs_new = r @ r
        p, rs = r + (rs_new / rs) * p, rs_new
    return x


def hand_step(train, val, lam, params0):
    w = {k: v.detach().requires_grad_() for k, v in hand_solve(train, lam, params0).items()}
    lam = lam.detach().requires_grad_()
    v = torch.autograd.grad(outer(w, val), list(w.values()))
    grads = torch.autograd.grad(inner(w, lam, train), list(w.values()), create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    leaves = list(w.values())

    def hvp(u):
        hv = torch.autograd.grad(flat_grad, leaves, u, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])

    u = hand_cg(hvp, torch.cat([g.reshape(-1) for g in v]))
    (meta_grad,) = torch.autograd.grad(flat_grad, lam, -u)
    return meta_grad


def torchopt_step_factory():
    try:
        import torchopt
    except ImportError:
        return None

    keys = ("W", "b")  # torchopt wants tensors or tuples of them, not dicts

    def optimality(params, lam, data):
        return torch.func.grad(lambda p: inner(dict(zip(keys, p)), lam, data))(params)

    solve = torchopt.linear_solve.solve_cg(maxiter=CG_MAXITER, rtol=CG_TOL)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(params, lam, data):
        return tuple(hand_solve(data, lam, dict(zip(keys, params))).values())

    def step(train, val, lam, params0):
        lam = lam.detach().requires_grad_()
        solution = solver(tuple(params0[k] for k in keys), lam, train)
        outer(dict(zip(keys, solution)), val).backward()
        return lam.grad

    return step


def implementations():
    found = {"bilevel Implicit": bilevel_step, "by hand": hand_step}
    torchopt_step = torchopt_step_factory()
    if torchopt_step is not None:
        found["torchopt custom_root"] = torchopt_step
    return found


def check_agreement() -> float:
    train, val, lam, params0 = make_problem()
    reference = hand_step(train, val, lam, params0)
    worst = 0.0
    for name, fn in implementations().items():
        got = fn(train, val, lam, params0)
        rel = float((got - reference).abs().max() / reference.abs().max())
        if rel > 1e-3:
            raise AssertionError(f"{name} disagrees with the hand-written hypergradient: {rel:.1e}")
        worst = max(worst, rel)
    return worst


# ----------------------------------------------------------------------------- pytest mode
def test_agreement():
    assert check_agreement() < 1e-3


def test_bilevel_implicit_step(benchmark):
    train, val, lam, params0 = make_problem()
    benchmark.pedantic(bilevel_step, args=(train, val, lam, params0), rounds=5, warmup_rounds=1)


def test_hand_implicit_step(benchmark):
    train, val, lam, params0 = make_problem()
    benchmark.pedantic(hand_step, args=(train, val, lam, params0), rounds=5, warmup_rounds=1)


# ----------------------------------------------------------------------------- script mode
def interleaved_medians(fns: dict, args: tuple, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn(*args)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.thread_time()  # CPU time of this thread: robust to a shared machine
            fn(*args)
            times[name].append(time.thread_time() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    worst = check_agreement()
    train, val, lam, params0 = make_problem()
    print(
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}, "
        f"threads {torch.get_num_threads()}, repeats {args.repeats}, load "
        f"{os.getloadavg()[0]:.1f}; max rel. deviation of the hypergradients {worst:.1e}"
    )
    solves = {"bilevel Implicit": bilevel_solve, "by hand": hand_solve}
    for title, fns, fn_args in (
        ("inner solve, 100 steps", solves, (train, lam, params0)),
        ("outer step (solve + hypergradient)", implementations(), (train, val, lam, params0)),
    ):
        medians = interleaved_medians(fns, fn_args, args.repeats)
        base = medians["by hand"]
        print(f"{title}")
        for name, seconds in medians.items():
            print(f"  {name:<22} {seconds * 1e3:8.2f} ms   {seconds / base:6.3f} x by hand")


if __name__ == "__main__":
    main(sys.argv[1:])
