"""The examples in examples/ run (in their --quick sizes) and show what their docstrings say;
MAML under torchrun DDP gives the meta-gradient of one process.

This file is also the DDP worker: `torchrun --standalone --nproc-per-node 2 test_examples.py OUT`
takes each rank's share of one MAML meta-batch through `DistributedDataParallel` (gloo) and
leaves the all-reduced meta-gradient and the weights after a few meta-steps in OUT.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    """An example as a module (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", ROOT / "examples" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quietly(main, argv):
    """Run an example; a BilevelWarning (a false alarm in a worked example) fails the test."""
    import bilevel as bl

    with warnings.catch_warnings():
        warnings.simplefilter("error", bl.BilevelWarning)
        return main(argv)


def test_maml_sinusoid_example_learns_an_initialisation_that_adapts():
    result = quietly(load("maml_sinusoid").main, ["--quick"])
    assert result["after"] < 0.8 * result["before"]


def test_hyper_cleaning_example_down_weights_the_corrupted_labels():
    pytest.importorskip("sklearn", reason="the example's data comes from scikit-learn (dev extra)")
    result = quietly(load("hyper_cleaning").main, ["--quick"])
    assert result["accuracy"] > result["baseline_accuracy"] + 0.03
    assert result["clean_kept"] > 0.9 and result["corrupted_kept"] < 0.3


def test_imaml_example_matches_the_dense_meta_gradient_and_adapts():
    result = quietly(load("imaml").main, ["--quick"])
    assert result["dense_error"] < 1e-10
    assert result["after"] < result["before"]
    assert result["dropped"] < 0.5 * result["tasks"]


# --------------------------------------------------------------------------- MAML under DDP

ITERATIONS, META_BATCH = 3, 8


def maml_run():
    """A MAML meta-gradient on one meta-batch, then ITERATIONS meta-steps (incl. that one)."""
    example = load("maml_sinusoid")
    torch.manual_seed(0)
    first = {}

    def capture(result):  # the meta-gradient of the first step, before Adam moves anything
        first.update({k: p.grad.clone() for k, p in result.named_parameters()})

    example.train(iterations=1, meta_batch=META_BATCH, test_tasks=4, on_step=capture)["maml"]
    later = example.train(iterations=ITERATIONS, meta_batch=META_BATCH, test_tasks=4)["maml"]
    return first, {k: v.detach() for k, v in later.named_parameters()}


def worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        grads, weights = maml_run()
        if dist.get_rank() == 0:
            torch.save({"grads": grads, "weights": weights}, out / "ddp.pt")
    finally:
        dist.destroy_process_group()


def test_maml_under_torchrun_ddp_gives_the_meta_gradient_of_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", __file__, str(tmp_path)]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    ddp = torch.load(tmp_path / "ddp.pt")
    grads, weights = maml_run()
    assert grads.keys() == ddp["grads"].keys()
    for key in grads:
        torch.testing.assert_close(ddp["grads"][key], grads[key], rtol=1e-5, atol=1e-6, msg=key)
        assert grads[key].abs().max() > 1e-3  # a real gradient, not zeros on both sides
        torch.testing.assert_close(ddp["weights"][key], weights[key], rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # not tests/, whose tests/bilevel would shadow the library
    worker(Path(sys.argv[1]))
