"""Multi-process training (recipes/memdlm/loop/parallel.py): two CPU processes over gloo, launched
through torchrun from the test, give the losses of one process with the same global batch.

This file is also the worker: `torchrun --standalone --nproc-per-node 2 test_parallel.py OUT`
runs every scenario of `SCENARIOS` in one process group (one launch keeps the test fast) and
leaves one run folder per scenario in OUT. The tests compare those folders with the training
phase in one process (`loop.phase.train_phase`, no `ctx`) on the same rows, seed and
configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.memdlm.build import new_model
from recipes.memdlm.config import build_config
from recipes.memdlm.data.batches import BatchSampler, Encoded
from recipes.memdlm.data.tasks import ByteTokenizer
from recipes.memdlm.loop import parallel as distributed
from recipes.memdlm.loop import phase as train
from recipes.memdlm.loop import steps as loop_steps
from recipes.memdlm.loop.progress import Reporter

STEPS = 5
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32, reductions in a different order

# name -> (method, memdlm overrides, strategy, sync_inner)
SCENARIOS = {
    "standard": ("standard", {}, "ddp", False),
    "memdlm_per_sample": ("memdlm", {"per_sample": True}, "ddp", False),
    "memdlm_shared_sync": ("memdlm", {}, "ddp", True),
    "memdlm_shared": ("memdlm", {}, "ddp", False),
    "fsdp_standard": ("standard", {}, "fsdp", False),
    "fsdp_memdlm_per_sample": ("memdlm", {"per_sample": True}, "fsdp", False),
}
HF_SCENARIOS = {  # a tiny Qwen2-MoE from test_hf.py: unfused experts with fast weights
    "hf_ddp_per_sample": ("memdlm", {"per_sample": True}, "ddp", False),
    "hf_fsdp_shared_sync": ("memdlm", {}, "fsdp", True),
}
INTERRUPTED = {  # stopped by Ctrl-C before the batch of step 2, then resumed (or not)
    "ddp_resumed": ("memdlm", {"per_sample": True}, "ddp", False),
    "fsdp_resumed": ("memdlm", {"per_sample": True}, "fsdp", False),
    "ddp_left": ("standard", {}, "ddp", False),  # resumed by one process in the test
}


def config(method_name: str, memdlm: dict, model_path: str | None = None):
    # A strong inner loop, so that fast weights change the losses visibly.
    overrides = {"memdlm": {"inner_lr": 2.0, **memdlm}, "method": method_name}
    overrides["train"] = {"steps": STEPS, "batch_size": 8, "ckpt_every": 2}
    if model_path is not None:
        overrides["model"] = {"path": model_path}
        overrides["memdlm"]["layer_fraction"] = 0.5
    return build_config("smoke", overrides=overrides)


def rows(n: int = 48) -> list[Encoded]:
    """Rows of different lengths, so that batches are padded (padding is maskable and scored)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        prompt, response = (int(v) for v in torch.randint(4, 12, (2,), generator=g))
        tokens = torch.randint(0, 256, (prompt + response,), generator=g).tolist()
        out.append(Encoded(tuple(tokens[:prompt]), (*tokens[prompt:], ByteTokenizer.eos_id)))
    return out


def sampler_for(cfg, interrupt_at: int | None = None) -> BatchSampler:
    sampler = BatchSampler(rows(), cfg.train.batch_size, seed=cfg.seed, eos_id=258)
    if interrupt_at is not None:
        calls, draw = {"n": 0}, sampler.next

        def next_or_interrupt():
            calls["n"] += 1
            if calls["n"] == interrupt_at + 1:
                raise KeyboardInterrupt
            return draw()

        sampler.next = next_or_interrupt
    return sampler


def run(scenario, folder: Path, *, ctx=None, interrupt_at=None, model_path=None):
    """One training phase; `ctx` None = the single-process loop of train.py."""
    method_name, memdlm, strategy, sync = scenario
    cfg = config(method_name, memdlm, model_path)
    model = new_model(cfg, ByteTokenizer(), seed=cfg.seed, device="cpu")
    common = dict(
        phase=cfg.train,
        sampler=sampler_for(cfg, interrupt_at),
        seed=cfg.seed,
        folder=folder,
        log=loop_steps.MetricsLog(folder / "metrics.jsonl", {"phase": "train"}),
        reporter=Reporter(quiet=True),
    )
    settings = train.StepSettings(method_name, cfg.memdlm, ByteTokenizer.mask_id)
    if ctx is None:
        return model, train.train_phase(model, settings, **common)
    ctx = distributed.Context(ctx.rank, ctx.world_size, ctx.local_rank, ctx.device, strategy)
    settings = dataclasses.replace(settings, sync_inner=sync)
    return model, train.train_phase(model, settings, ctx=ctx, **common)


def worker(out: Path, hf_model: str | None) -> None:
    torch.set_num_threads(1)
    ctx = distributed.init(build_config("smoke").distributed, "cpu")
    try:
        for name, scenario in SCENARIOS.items():
            run(scenario, out / name, ctx=ctx)
        if hf_model is not None:
            for name, scenario in HF_SCENARIOS.items():
                run(scenario, out / name, ctx=ctx, model_path=hf_model)
        for name, scenario in INTERRUPTED.items():
            with contextlib.suppress(loop_steps.Interrupted):
                run(scenario, out / name, ctx=ctx, interrupt_at=2)
            if name != "ddp_left":
                run(scenario, out / name, ctx=ctx)
    finally:
        distributed.shutdown()


# --------------------------------------------------------------------------- the tests


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> str | None:
    """A tiny Hugging Face MoE model folder, or None without the `hf` extra."""
    try:
        from tests.recipes.backbones.test_hf import build
    except pytest.skip.Exception:
        return None
    return str(build("moe", tmp_path_factory.mktemp("hf") / "moe"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, hf_model) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    launch([__file__, str(out), *([hf_model] if hf_model else [])], cwd=out)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, tuple]:
    """name -> (model, losses, run folder) of the single-process loop, for every scenario."""
    out = tmp_path_factory.mktemp("single")
    result = {}
    for name, scenario in {**SCENARIOS, **INTERRUPTED}.items():
        model, _ = run(scenario, out / name)
        result[name] = (model, losses_in(out / name), out / name)
    return result


def losses_in(folder: Path, key: str = "loss") -> list[float]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(len(records)))  # one record per step
    return [r[key] for r in records if key in r]


def assert_same_weights(folder: Path, model: torch.nn.Module) -> None:
    """Weights after the run. Adam divides by sqrt(v): for an element whose gradient is at the
    rounding level, a float32 reduction-order difference can move it by a fraction of lr (3e-4
    here), so weights get atol 1e-4 while the losses are held to 1e-5."""
    saved = torch.load(folder / "model.pt", weights_only=False)["model"]
    expected = model.state_dict()
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-4, msg=key)


@pytest.mark.parametrize(
    "name",
    [
        "standard",
        "memdlm_per_sample",
        "memdlm_shared_sync",
        "fsdp_standard",
        "fsdp_memdlm_per_sample",
    ],
)
def test_two_processes_give_the_losses_and_weights_of_one(two_ranks, one_process, name):
    model, expected, _ = one_process[name]
    got = losses_in(two_ranks / name)
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **TOLERANCE)
    assert_same_weights(two_ranks / name, model)


@pytest.mark.parametrize("name", sorted(HF_SCENARIOS))
def test_a_hugging_face_moe_backbone_trains_exactly_on_two_processes(
    two_ranks, hf_model, tmp_path, name
):
    if hf_model is None:
        pytest.skip("needs the optional extra 'hf' (transformers)")
    model, _ = run(HF_SCENARIOS[name], tmp_path, model_path=hf_model)
    got, expected = losses_in(two_ranks / name), losses_in(tmp_path)
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **TOLERANCE)
    assert_same_weights(two_ranks / name, model)


@pytest.mark.parametrize("name", ["memdlm_per_sample", "memdlm_shared_sync"])
@pytest.mark.parametrize("key", ["loss_off", "inner_loss_1", "inner_loss_2", "inner_grad_norm_2"])
def test_inner_metrics_of_exact_modes_are_those_of_the_global_batch(
    two_ranks, one_process, name, key
):
    got = losses_in(two_ranks / name, key)
    expected = losses_in(one_process[name][2], key)
    assert len(got) == len(expected) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), **TOLERANCE)


def test_shared_fast_weights_without_sync_differ_from_one_process(two_ranks, one_process):
    # Documented semantics: each rank adapts its own phi on its own rows (docs/scaling.md).
    _, expected, _ = one_process["memdlm_shared"]
    got = losses_in(two_ranks / "memdlm_shared")
    assert (torch.tensor(got) - torch.tensor(expected)).abs().max() > 1e-5


@pytest.mark.parametrize("name", ["ddp_resumed", "fsdp_resumed"])
def test_resume_across_ranks_gives_the_uninterrupted_losses(two_ranks, one_process, name):
    model, expected, _ = one_process[name]
    torch.testing.assert_close(
        torch.tensor(losses_in(two_ranks / name)), torch.tensor(expected), **TOLERANCE
    )
    assert_same_weights(two_ranks / name, model)


def test_a_two_process_checkpoint_resumes_in_one_process(two_ranks, one_process, tmp_path):
    folder = two_ranks / "ddp_left"
    assert (folder / "checkpoint.pt").exists() and not (folder / "model.pt").exists()
    assert len(losses_in(folder)) == 2
    model, _ = run(INTERRUPTED["ddp_left"], folder)
    expected_model, expected, _ = one_process["ddp_left"]
    torch.testing.assert_close(torch.tensor(losses_in(folder)), torch.tensor(expected), **TOLERANCE)
    for (key, a), b in zip(model.state_dict().items(), expected_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4, msg=key)


def test_the_cli_trains_under_torchrun_and_writes_one_run_folder(tmp_path):
    options = ["--preset", "smoke", "--method", "memdlm", "--memdlm.per_sample", "true"]
    options += ["--train.steps", "2", "--data.eval_per_cell", "1", "--eval.exposure_examples", "1"]
    launch(["-m", "recipes.memdlm", "train", *options, "--out", "run", "--quiet"], cwd=tmp_path)
    run_folder = tmp_path / "run"
    assert {"config.json", "metrics.jsonl", "summary.json", "model.pt", "checkpoint.pt"} <= {
        p.name for p in run_folder.iterdir()
    }
    summary = json.loads((run_folder / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "strategy": "ddp"}
    # The same two steps in one process, from the same configuration and data.
    from recipes.memdlm.commands.folders import resumed_config
    from recipes.memdlm.data.prepare import prepare_data

    cfg = resumed_config(run_folder)
    data = prepare_data(cfg)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device="cpu")
    train.train_phase(
        model,
        train.StepSettings("memdlm", cfg.memdlm, ByteTokenizer.mask_id, time_eps=cfg.time_eps),
        phase=cfg.train,
        sampler=BatchSampler(data.train, cfg.train.batch_size, seed=cfg.seed, eos_id=258),
        seed=cfg.seed,
        folder=tmp_path / "single",
        log=loop_steps.MetricsLog(tmp_path / "single" / "metrics.jsonl", {"phase": "train"}),
        reporter=Reporter(quiet=True),
    )
    torch.testing.assert_close(
        torch.tensor(losses_in(run_folder)),
        torch.tensor(losses_in(tmp_path / "single")),
        **TOLERANCE,
    )


def test_a_user_error_under_torchrun_leaves_no_run_folder(tmp_path):
    # A global batch of 7 rows cannot be split between 2 ranks: train_phase finds it after rank
    # 0 has created the run folder and written its config.json, so rank 0 must remove it again.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    command += ["2", "-m", "recipes.memdlm", "train", "--preset", "smoke", "--quiet"]
    command += ["--method", "standard", "--train.batch_size", "7", "--out", "run"]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0
    assert "train.batch_size=7 (the global batch) must be divisible" in done.stdout + done.stderr
    assert not (tmp_path / "run").exists()


def test_global_batch_must_divide_among_ranks():
    ctx = distributed.Context(0, 3, 0, torch.device("cpu"))
    assert ctx.rows(9) == slice(0, 3)
    with pytest.raises(ValueError, match="batch_size=8.*divisible by the number of processes 3"):
        ctx.rows(8)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
