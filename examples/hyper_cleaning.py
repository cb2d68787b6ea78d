"""Data hyper-cleaning on scikit-learn's digits with implicit gradients (`bl.Implicit`).

Half of the training labels are replaced by wrong ones. Learn one weight per training example,
sigma(lambda_i), so that a linear classifier trained on the weighted loss does well on a small
clean validation set (Franceschi et al. 2017; Shaban et al. 2019). The inner problem is solved
by SGD with momentum, warm-started from the previous outer step's solution; the hypergradient
-(d2f/dw dlambda)^T (d2f/dw2)^-1 dL_val/dw comes from CG on Hessian-vector products.

The warm-start recipe: the stationarity check compares ||grad f(w_K)|| with a reference. Its
default, ||grad f(w_0)||, is small after a warm start, so the check would fire on every step;
pass the gradient norm of the first (cold) solve once as `stationarity_scale`.

    python examples/hyper_cleaning.py          # about 15 s on a laptop CPU
    python examples/hyper_cleaning.py --quick  # a few seconds (what the test runs)

Needs scikit-learn (in the `dev` extra) for the data only.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import bilevel as bl


def load(seed: int = 0, n_train: int = 600, n_val: int = 300, corrupt: float = 0.5):
    """Digits split into a corrupted training set, a clean validation set and a test set."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=generator)
    X, y = X[order], y[order]
    train = slice(0, n_train)
    val = slice(n_train, n_train + n_val)
    test = slice(n_train + n_val, None)
    noisy = y[train].clone()
    flipped = torch.rand(n_train, generator=generator) < corrupt
    shift = torch.randint(1, 10, (n_train,), generator=generator)  # a different class
    noisy[flipped] = (noisy[flipped] + shift[flipped]) % 10
    return {
        "train": (X[train], noisy),
        "val": (X[val], y[val]),
        "test": (X[test], y[test]),
        "flipped": flipped,
    }


def logits(params, X):
    return X @ params["W"] + params["b"]


def weighted_loss(params, weight_logits, data, reg: float = 1e-2):
    """mean_i sigma(lambda_i) CE_i + reg/2 ||W||^2: the inner objective."""
    X, y = data
    per_example = F.cross_entropy(logits(params, X), y, reduction="none")
    return (torch.sigmoid(weight_logits) * per_example).mean() + 0.5 * reg * (
        params["W"] ** 2
    ).sum()


def accuracy(params, data) -> float:
    X, y = data
    return float((logits(params, X).argmax(1) == y).float().mean())


def run(
    *, outer_steps: int = 150, inner_steps: int = 100, seed: int = 0, log_every: int = 0
) -> dict:
    data = load(seed)
    n_train = len(data["train"][1])
    weight_logits = torch.zeros(n_train, requires_grad=True)
    outer_opt = torch.optim.Adam([weight_logits], lr=0.1)
    inner_opt = bl.sgd(1.0, momentum=0.9)
    params = {"W": torch.zeros(64, 10), "b": torch.zeros(10)}

    # The first, cold solve gives the uniform-weight baseline and the stationarity scale.
    cold, info = bl.solve_with_info(
        weighted_loss,
        params,
        weight_logits.detach(),
        optimizer=inner_opt,
        steps=inner_steps,
        data=data["train"],
        mode=bl.FirstOrder(),
    )
    baseline = accuracy(cold, data["test"])
    mode = bl.Implicit(
        bl.CG(maxiter=50, tol=1e-4),
        stationarity_rtol=1e-2,
        stationarity_scale=float(info.grad_norm[0]),
    )
    params = {k: v.detach() for k, v in cold.items()}  # warm start
    for step in range(outer_steps):
        solution = bl.solve(
            weighted_loss,
            params,
            weight_logits,
            optimizer=inner_opt,
            steps=inner_steps,
            data=data["train"],
            mode=mode,
        )
        X_val, y_val = data["val"]
        val_loss = F.cross_entropy(logits(solution, X_val), y_val)
        outer_opt.zero_grad()
        val_loss.backward()  # the implicit hypergradient reaches weight_logits
        outer_opt.step()
        params = {k: v.detach() for k, v in solution.items()}  # warm start the next solve
        if log_every and (step + 1) % log_every == 0:
            print(f"outer step {step + 1}: validation loss {float(val_loss.detach()):.4f}")
    kept = torch.sigmoid(weight_logits.detach()) > 0.5
    flipped = data["flipped"]
    return {
        "baseline_accuracy": baseline,
        "accuracy": accuracy(params, data["test"]),
        "clean_kept": float(kept[~flipped].float().mean()),
        "corrupted_kept": float(kept[flipped].float().mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quick = dict(outer_steps=15, inner_steps=60) if args.quick else dict(log_every=50)
    result = run(**quick)
    print(
        f"test accuracy: {100 * result['baseline_accuracy']:.1f}% with uniform weights, "
        f"{100 * result['accuracy']:.1f}% with learned weights; kept (weight > 0.5) "
        f"{100 * result['clean_kept']:.0f}% of clean and {100 * result['corrupted_kept']:.0f}% "
        "of corrupted examples"
    )
    return result


if __name__ == "__main__":
    main()
