"""The lm-eval model `memdlm` across processes (recipes/memdlm/eval/ranks.py): two CPU processes
over gloo, launched by `torchrun` and by `accelerate launch` running the harness command, each
evaluate their share of the requests, and rank 0 writes the results of one process, bit for bit.

Oracle: lm-eval's `simple_evaluate` in this process (one process, world size 1) with the same
model args, on the same local tasks: multiple choice (4 documents, 12 loglikelihood requests),
perplexity (2 documents) and exact-match generation (3 documents: an uneven split, so lm-eval
pads rank 1 with a copy of its last request).
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="memdlm-ranks-datasets-"))

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from recipes.memdlm.data.prepare import prepare_data  # noqa: E402
from recipes.memdlm.eval import ranks  # noqa: E402
from recipes.memdlm.eval.harness import MemDLMLM, load_run  # noqa: E402
from tests.recipes.eval.test_harness import (  # noqa: E402
    TEXTS,
    choice_task,
    evaluate,
    generation_task,
    write_task,
)

NAMES = ["choice", "rolling", "gen"]
MODEL_ARGS = {"mc_num": 4, "mc_batch": 4, "adapt": "true", "inner_lr": 5.0}
# requests per rank (rank 0, rank 1) of 2; one process runs 12, 2 and 3
SHARES = {"loglikelihood": (6, 6), "loglikelihood_rolling": (1, 1), "generate_until": (2, 2)}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, run_dir) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    choice_task(folder)
    write_task(
        folder,
        "rolling",
        TEXTS,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    )
    examples = prepare_data(load_run(run_dir, device="cpu").config).accuracy_eval[:3]
    rows = [{"prompt": e.prompt, "response": e.response} for e in examples]
    generation_task(folder, "gen", rows, max(len(r["response"]) for r in rows) + 1)
    return folder


@pytest.fixture(scope="module")
def one_process(run_dir, tasks) -> dict:
    lm = MemDLMLM(run=str(run_dir), device="cpu", **MODEL_ARGS)
    assert (lm.rank, lm.world_size) == (0, 1)
    return evaluate(lm, tasks, NAMES)


def launch(launcher: str, run_dir: Path, tasks: Path, out: Path) -> subprocess.CompletedProcess:
    """The documented N-process command with N = 2, on the CPU."""
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", "2"]
    else:  # accelerate's multi-process launcher (torch.distributed.run underneath)
        pytest.importorskip("accelerate")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        command += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        command += ["--dynamo_backend", "no", "--main_process_port", "0"]
    args = ",".join(f"{k}={v}" for k, v in {"run": run_dir, **MODEL_ARGS}.items())
    command += ["-m", "recipes.memdlm", "harness", "--model", "memdlm", "--model_args", args]
    command += ["--tasks", ",".join(NAMES), "--include_path", str(tasks), "--device", "cpu"]
    command += ["--log_samples", "--output_path", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    done = subprocess.run(
        command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


def shares(log: str) -> dict[str, tuple[int, ...]]:
    """{request type: (count on rank 0, count on rank 1)} from the model's per-rank lines."""
    found: dict[str, dict[int, int]] = {}
    for rank, count, kind in re.findall(r"memdlm rank (\d) of 2: (\d+) (\w+) requests", log):
        assert int(rank) not in found.setdefault(kind, {})  # one call per type and rank
        found[kind][int(rank)] = int(count)
    return {kind: tuple(by_rank[r] for r in sorted(by_rank)) for kind, by_rank in found.items()}


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_share_the_requests_and_give_one_process_scores(
    run_dir, tasks, one_process, tmp_path, launcher
):
    out = tmp_path / "results"
    done = launch(launcher, run_dir, tasks, out)
    assert shares(done.stderr) == SHARES  # each rank ran its half (plus lm-eval's padding)
    (path,) = out.rglob("results_*.json")  # rank 0 alone writes
    saved = json.loads(path.read_text())
    assert saved["results"] == one_process["results"]  # every score and stderr, exactly
    for name in NAMES:
        (file,) = out.rglob(f"samples_{name}_*.jsonl")
        lines = [json.loads(line) for line in file.read_text().splitlines()]
        order = [s["doc_id"] for s in one_process["samples"][name]]
        assert [s["doc_id"] for s in lines] == order  # documents in one process's order
        got = {s["doc_id"]: s["resps"] for s in lines}
        want = {s["doc_id"]: leaves_as_text(s["resps"]) for s in one_process["samples"][name]}
        for doc_id, resps in want.items():  # resps: one list of responses per request
            for got_one, want_one in zip(got[doc_id], resps, strict=True):
                # lm-eval's padding on rank 1 runs its last request again: one more response
                assert got_one[: len(want_one)] == want_one


def leaves_as_text(value):
    """As lm-eval writes responses to its samples file: lists of str(leaf) (repr of a float)."""
    if isinstance(value, (list, tuple)):
        return [leaves_as_text(v) for v in value]
    return str(value)


def test_gathered_metrics_and_samples_are_put_back_in_document_order():
    """Rank r holds documents r, r + 3, ...; lm-eval concatenates the parts in rank order, and
    float sums depend on the order: the merged part gives the one-process list."""
    values = [0.1, 0.7, 0.2, 1e16, 0.3, -1e16, 0.9]  # documents 0..6
    parts = [{"t": {("acc", "none"): values[r::3]}} for r in range(3)]
    chained = [v for part in ranks.in_document_order(parts) for v in part["t"][("acc", "none")]]
    assert chained == values
    plain = [v for part in parts for v in part["t"][("acc", "none")]]
    assert sum(plain) != sum(values)  # the order the merge restores does change the mean
    # A rank without documents of a task has no entries for it (3 documents, 4 ranks).
    few = [{"t": {("acc", "none"): [float(r)]}} for r in range(3)] + [{"t": {}}]
    merged = ranks.in_document_order(few)
    assert [v for part in merged for v in part["t"][("acc", "none")]] == [0.0, 1.0, 2.0]
    # Samples: filter by filter, documents in order within each.
    samples = [
        {"t": [{"doc_id": d, "filter": f} for f in ("a", "b") for d in range(r, 5, 2)]}
        for r in range(2)
    ]
    chained = [s for part in ranks.in_document_order(samples) for s in part["t"]]
    assert chained == [{"doc_id": d, "filter": f} for f in ("a", "b") for d in range(5)]
    # Lengths that are not one per document are left as they came.
    uneven = [{"t": {("acc", "none"): [1.0]}}, {"t": {("acc", "none"): [2.0, 3.0]}}]
    assert ranks.in_document_order(uneven) is uneven


@pytest.mark.parametrize("asked", [None, "auto", "cuda", "cuda:0", "cuda:5"])
def test_each_launched_process_takes_the_gpu_of_its_local_rank(monkeypatch, asked):
    """lm-eval's CLI asks every process for cuda:0; under a launcher process r takes cuda:r, as
    lm-eval's HFLM does. (The CUDA query is faked: no GPU here; no tensor is made.)"""
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    one = torch.device("cuda" if asked in (None, "auto") else asked)
    assert ranks.process_device(asked) == one  # one process: as asked
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ranks.process_device(asked) == torch.device("cuda", 3)
    assert ranks.process_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA or the CPU"):
        ranks.process_device("meta")
