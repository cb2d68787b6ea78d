"""The paper's two runs (configs/paper-*.toml) end to end on the tiny real-remote-code stand-ins:
the same TOML with `model.path` pointed at the stand-in and 4-bit off (CPU), a fifth of an
epoch, a LongAlpaca-shaped file of Alpaca records. One command each, as docs/reproduce.md
gives them: `train`, Train-Only and Train & Inference through lm-eval on local tasks
(`harness`), and the comparison table (`compare`: Standard and MemDLM).

Checked beyond "it runs": the run's configuration is the TOML's, value for value, but for the
four overrides; the steps, evaluations and checkpoints follow the epoch plan; the held-out split
is the authors' (`datasets.train_test_split`, 1 of 20 records); the fast weights sit on every
routed expert of the last 10% of layers (LLaDA2.1 also on `mlp.shared_experts`, as the
reference code; LLaDA-MoE's shared expert never); adapting at inference changes lm-eval's
log-likelihoods, leaving it off does not.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="memdlm-paper-datasets-"))

import json
import math
import random
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("lm_eval")

from recipes.memdlm.cli import main
from recipes.memdlm.config import build_config
from tests.recipes.backbones import standins

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = {"llada_moe": "paper-llada-moe.toml", "llada21": "paper-llada21-mini.toml"}
# LLaDA2.1 is evaluated with the authors' LLaDA2.1 sampler (docs/reproduce.md).
SAMPLER = {"llada_moe": "", "llada21": ",sampler=llada21,block_length=8,steps=8"}
# A chat template in the LLaDA-MoE/LLaDA2 style (end of turn <|role_end|>): the TOMLs encode
# with the tokenizer's template, as the authors' default_sft_map_fn.
TEMPLATE = (
    "{% for m in messages %}<|role_end|>{{ m['role'] }}\n{{ m['content'] | trim }}<|role_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|role_end|>assistant\n{% endif %}"
)


def alpaca_records(n: int = 20) -> list[dict]:
    """LongAlpaca's record shape: instruction, input (sometimes empty), output."""
    rng = random.Random(0)
    words = [
        "the",
        "code",
        "of",
        "the",
        "river",
        "is",
        "blue",
        "and",
        "the",
        "stone",
        "keeps",
        "a",
        "number",
        "for",
        "the",
        "reader",
    ]
    return [
        {
            "instruction": f"Read the text and answer: what is code {i}?",
            "input": " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
            if i % 3
            else "",
            "output": f"code {i} is {rng.randint(10, 99)}",
        }
        for i in range(n)
    ]


def write_tasks(folder: Path) -> Path:
    """A generation task (exact match) and a multiple-choice task (log-likelihoods)."""
    folder.mkdir()
    rows = {
        "paper_gen": [
            {"prompt": f"Read the text and answer: what is code {i}?", "response": f"code {i}"}
            for i in range(2)
        ],
        "paper_choice": [
            {"question": f"the stone code is {i}. stone code?", "choices": [str(i), str(i + 1)],
             "label": 0}
            for i in range(3)
        ],
    }  # fmt: skip
    bodies = {
        "paper_gen": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{response}}"\ngeneration_kwargs:\n  until: []\n  max_gen_toks: 8\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n",
        "paper_choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n",
    }
    for name, records in rows.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        head = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {data}\ntest_split: test\n"
        )
        (folder / f"{name}.yaml").write_text(head + bodies[name])
    return folder


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def paper(request, tmp_path_factory):
    """A stand-in of the family (with a chat template), the data file, the local tasks and the
    command-line options that point the paper's TOML at them."""
    import transformers

    family = request.param
    root = tmp_path_factory.mktemp(f"paper-{family}")
    folder = standins.write(family, root / "model")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(folder)
    data = root / "LongAlpaca-12k.json"
    data.write_text(json.dumps(alpaca_records()))
    options = [
        "--config", str(ROOT / "configs" / CONFIGS[family]),
        "--model.path", str(folder), "--model.load_in_4bit", "false",
        "--data.train_file", str(data), "--train.epochs", "0.4", "--quiet",
    ]  # fmt: skip
    return {"family": family, "root": root, "options": options, "tasks": write_tasks(root / "t")}


def test_train_is_the_papers_run_on_the_stand_in(paper):
    run = paper["root"] / "memdlm"
    assert main(["train", *paper["options"], "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    toml = build_config(toml_file=ROOT / "configs" / CONFIGS[paper["family"]]).model_dump()
    overridden = {("model", "path"), ("model", "load_in_4bit"), ("data", "train_file"),
                  ("train", "epochs")}  # fmt: skip
    for section in ("model", "data", "train", "memdlm", "eval", "distributed"):
        for key, value in toml[section].items():
            if (section, key) not in overridden:
                assert cfg[section][key] == value, f"{section}.{key}"
    assert (cfg["train"]["epochs"], cfg["model"]["load_in_4bit"]) == (0.4, False)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["phase"] == "train"]
    # 19 rows (1 of 20 held out), 2 per step: ceil(0.4 * ceil(19 / 2)) = 4 steps; evaluations
    # and checkpoints every ceil(0.1 * 4) = 1 step; the length-grouped epoch's first batch
    # holds its longest row.
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    evals = [r for r in records if r["phase"] == "train_eval"]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert all(math.isfinite(r["eval_loss"]) for r in evals)
    assert all(math.isfinite(r["eval_loss_answer_adapted"]) for r in evals)

    summary = json.loads((run / "summary.json").read_text())
    line = (
        summary["backbone"]
        if isinstance(summary["backbone"], str)
        else json.dumps(summary["backbone"])
    )
    assert "experts" in line
    shared = "shared_experts" in line
    assert shared == (paper["family"] == "llada21")  # the reference code's rule, per family
    assert "shared_expert." not in line  # LLaDA-MoE's layer-level shared expert: never


def lm_eval_results(folder: Path) -> tuple[dict, list[float]]:
    """lm-eval's results and the choice log-likelihoods from its sample log."""
    results = json.loads(next(folder.rglob("results_*.json")).read_text())["results"]
    samples = [json.loads(line) for f in folder.rglob("samples_paper_choice_*.jsonl")
               for line in f.read_text().splitlines()]  # fmt: skip
    scores = [
        float(r[0][0]) for s in sorted(samples, key=lambda s: s["doc_id"]) for r in s["resps"]
    ]
    return results, scores


def test_train_only_and_train_and_inference_through_lm_eval(paper):
    run = paper["root"] / "memdlm"
    if not (run / "model.pt").exists():
        pytest.skip("needs test_train_is_the_papers_run_on_the_stand_in")
    found = {}
    for name, adapt in (("train-only", "false"), ("train-inference", "true")):
        out = paper["root"] / "results" / name
        args = f"run={run},adapt={adapt},mc_num=8,mc_batch=8{SAMPLER[paper['family']]}"
        code = main(["harness", "--model", "memdlm", "--model_args", args,
                     "--tasks", "paper_gen,paper_choice", "--include_path", str(paper["tasks"]),
                     "--output_path", str(out), "--log_samples"])  # fmt: skip
        assert code == 0
        found[name] = lm_eval_results(out)
    for name, (results, scores) in found.items():
        assert 0 <= results["paper_gen"]["exact_match,none"] <= 1, name
        assert len(scores) == 6 and all(math.isfinite(s) and s <= 0 for s in scores), name
    # Adapting to each context changes every log-likelihood; the seeds are the same.
    assert all(a != b for a, b in zip(found["train-only"][1], found["train-inference"][1]))


def test_the_comparison_table(paper, capsys):
    out = paper["root"] / "compare"
    assert main(["compare", *paper["options"], "--workers", "1", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for row in ("Standard MDLM", "MemDLM Train-Only", "MemDLM Train & Inf."):
        assert row in table
    summary = json.loads((out / "summary.json").read_text())
    for method in ("standard", "memdlm"):
        record = summary[method]["per_seed"][0]
        assert record["seed"] == 42 and math.isfinite(record["eval_loss"])


def test_the_estimate_of_the_papers_run(paper, capsys):
    code = main(["estimate", *paper["options"], "--gpus", "2", "--gpu-memory", "80",
                 "--tokens-per-second", "5000"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    # 19 rows, 2 per device on 2 GPUs: ceil(0.4 * ceil(19 / 4)) = 2 steps of 4 rows
    assert "plan: 2 steps = 0.4 epochs x 5 steps (ceil(19 rows / 4)); global batch 4" in text
    assert "fits: yes" in text and "s per step" in text and ", lora" in text
