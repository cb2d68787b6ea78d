"""The lm-eval model `memdlm` (recipes/memdlm/eval/harness.py), offline: a tiny run folder built
here, local task YAMLs over JSONL files written here (exact-match generation, multiple choice,
perplexity), lm-eval's own `simple_evaluate` and command line.

Oracles: the recipe's own `niah_accuracy` on the same examples, the Python API
(`api.adapt_prompt`, `api.log_likelihood`) with the seeds the harness documents, the exact ELBO
by enumeration of every mask, the sampler's one-step greedy decoding.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="memdlm-harness-datasets-"))

import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import diffusion as dd  # noqa: E402
from recipes.memdlm import api  # noqa: E402
from recipes.memdlm.data.prepare import prepare_data  # noqa: E402
from recipes.memdlm.eval import harness_setup  # noqa: E402
from recipes.memdlm.eval.harness import MemDLMLM, load_run, request_seed  # noqa: E402
from recipes.memdlm.eval.metrics import niah_accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
# lm-eval scores " " + choice after the question (its default target delimiter)
CHOICES = [
    {"question": "the daisy code is 6Q. daisy code?", "choices": ["6Q", "3D", "6Q"], "label": 0},
    {"question": "the ember code is 3D. ember code?", "choices": ["6Q", "3D", "1Z"], "label": 1},
    {"question": "the topaz code is 1Z. topaz code?", "choices": ["1Z", "6I", "3D"], "label": 0},
    {"question": "the coral code is 6I. coral code?", "choices": ["3D", "1Z", "6I"], "label": 2},
]
TEXTS = [
    {"text": "the quick brown fox jumps over the lazy dog"},
    {"text": "a short line of prose, for perplexity"},
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir, device="cpu")


def write_task(folder: Path, name: str, rows: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    head = (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\n"
    )
    (folder / f"{name}.yaml").write_text(head + body)


def choice_task(folder: Path) -> None:
    """The multiple-choice task on CHOICES (lm-eval's `acc`), named "choice"."""
    write_task(
        folder,
        "choice",
        CHOICES,
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: choices\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n",
    )


def generation_task(folder: Path, name: str, rows: list[dict], max_gen_toks: int, until="[]"):
    write_task(
        folder,
        name,
        rows,
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{response}}"\n'
        f"generation_kwargs:\n  until: {until}\n  max_gen_toks: {max_gen_toks}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
        "    higher_is_better: true\n",
    )


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, loaded) -> Path:
    """One exact-match task per NIAH task of the run's held-out cells (4 examples each, in
    `niah_accuracy`'s order), a multiple-choice task and a perplexity task."""
    folder = tmp_path_factory.mktemp("tasks")
    examples = prepare_data(loaded.config).accuracy_eval
    for task in sorted({e.task for e in examples}):
        rows = [{"prompt": e.prompt, "response": e.response} for e in examples if e.task == task]
        generation_task(folder, f"niah_{task}", rows, len(rows[0]["response"]) + 1)
    choice_task(folder)
    write_task(
        folder,
        "rolling",
        TEXTS,
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n",
    )
    return folder


def evaluate(lm, folder: Path, names: list[str], **kwargs) -> dict:
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, log_samples=True, **kwargs
    )


def expected_score(lm: MemDLMLM, context: str, continuation: str) -> float:
    """The documented loglikelihood: adapt (when on) with the context's own seed, then the ELBO
    with the context's 'elbo' seed, through the public API only."""
    ctx, cont = harness_setup.encode_pair(lm.tokenizer, context, continuation)
    state = mem = None
    if lm.fast_weights is not None:
        generator = torch.Generator().manual_seed(request_seed(lm.options.seed, ctx, "adapt"))
        mem = lm.fast_weights
        state = api.adapt_prompt(
            lm.model,
            torch.tensor([ctx]),
            mask_id=lm.mask_id,
            fast_weights=mem,
            config=lm.inner,
            generator=generator,
        )
    value = api.log_likelihood(
        lm.model,
        torch.tensor(ctx),
        torch.tensor([cont]),
        mask_id=lm.mask_id,
        state=state,
        fast_weights=mem,
        mc_num=lm.options.mc_num,
        mc_batch=lm.options.mc_batch,
        generator=torch.Generator().manual_seed(request_seed(lm.options.seed, ctx, "elbo")),
    )
    return float(value[0])


# --------------------------------------------------------------------------- model args


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"run": "x", "inner_lrr": 1}, "'inner_lrr'"),
        ({"run": "x", "pretrained": "y"}, "exactly one of run="),
        ({}, "exactly one of run="),
        ({"run": "x", "mc_num": "many"}, "mc_num='many'"),
        ({"run": "x", "mc_batch": 0}, "mc_batch"),
        ({"run": "x", "remasking": "best"}, "remasking='best'"),
        ({"run": "x", "inner_lr": 0.3}, "inner_lr sets the inner loop"),
        ({"run": "x", "load_in_4bit": True}, "load_in_4bit"),
        ({"run": "x", "adapt": True, "gap_every": 2}, "'gap_every'"),  # training only
    ],
)
def test_bad_model_args_raise_value_errors_naming_the_arg(args, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        harness_setup.parse_model_args(args)


def test_a_bad_inner_loop_value_names_the_field(loaded):
    with pytest.raises(ValueError, match="inner_steps"):
        MemDLMLM.from_loaded(loaded, adapt=True, inner_steps=0)


def test_model_args_are_typed_and_inner_loop_overrides_reach_the_config(loaded):
    lm = MemDLMLM.from_loaded(loaded, adapt="true", inner_lr="0.7", mc_num="8", batch_size="auto")
    assert lm.inner.inner_lr == 0.7 and lm.inner.rank == loaded.config.memdlm.rank
    assert lm.options.mc_num == 8 and lm.options.batch_size == 1
    assert lm.fast_weights is not None
    assert MemDLMLM.from_loaded(loaded).fast_weights is None  # adaptation off by default


def test_a_cuda_device_falls_back_to_the_cpu_without_cuda(run_dir):
    lm = MemDLMLM(run=str(run_dir / "model.pt"), device="cuda:0", mc_num=4)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert lm.device.type == expected and next(lm.model.parameters()).device.type == expected


# --------------------------------------------------------------------------- the API


def test_one_prompts_state_is_bound_on_all_rows_as_if_repeated(loaded):
    """api.log_likelihood binds a batch-1 state shared over the B * mc_batch rows: the same
    numbers as binding the state repeated along dim 0 to the estimator's row count."""
    model, mask_id = loaded.model, loaded.tokenizer.mask_id
    mem = api.fast_weights_for(model, loaded.config.memdlm)
    try:
        prompt = torch.tensor([list(b"the daisy code is 6Q. daisy code? ")])
        state = api.adapt_prompt(
            model,
            prompt,
            mask_id=mask_id,
            fast_weights=mem,
            config=loaded.config.memdlm.model_copy(update={"inner_lr": 5.0}),
        )
        responses = torch.tensor([list(b"6Q"), list(b"3D"), list(b"1Z")])
        got = api.log_likelihood(
            model, prompt, responses, mask_id=mask_id, state=state, fast_weights=mem,
            mc_num=8, mc_batch=4, generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        repeated = {k: v.repeat(3 * 4, *([1] * (v.dim() - 1))) for k, v in state.items()}
        with torch.no_grad(), mem.bind(repeated):
            want = dd.elbo_log_likelihood(
                model, prompt.expand(3, -1), responses, mask_id=mask_id, mc_num=8,
                batch_size=4, generator=torch.Generator().manual_seed(3),
            )  # fmt: skip
        off = api.log_likelihood(
            model, prompt, responses, mask_id=mask_id, mc_num=8, mc_batch=4,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
    finally:
        mem.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - off).abs().max() > 1e-3  # the state is really bound


def exact_elbo(model, prompt, response, mask_id, mem=None, state=None) -> float:
    """The ELBO by enumeration: sum over l of the mean over all l-subsets S of
    -(1/l) sum_{i in S} CE_i (every mask of the response scored once)."""
    length = response.numel()
    total = 0.0
    for size in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), size))
        x = torch.cat([prompt, response]).repeat(len(subsets), 1)
        for row, subset in enumerate(subsets):
            x[row, [prompt.numel() + i for i in subset]] = mask_id
        with torch.no_grad(), mem.bind(api.shared_state(state)) if mem else torch.no_grad():
            logp = torch.log_softmax(model(x).double(), -1)[:, prompt.numel() :]
        token = logp.gather(-1, response.expand(len(subsets), -1).unsqueeze(-1)).squeeze(-1)
        masked = x[:, prompt.numel() :] == mask_id
        total += float((token * masked).sum(1).mean()) / size
    return total


def test_the_adapted_elbo_is_unbiased_for_the_adapted_model(loaded):
    """The Monte Carlo mean matches the enumerated ELBO of the adapted model, and that differs
    from the unadapted one by more than the tolerance (so the check can tell them apart)."""
    model, mask_id = loaded.model, loaded.tokenizer.mask_id
    mem = api.fast_weights_for(model, loaded.config.memdlm)
    try:
        prompt = torch.tensor(list(b"the ember code is 3D. ember code? "))
        response = torch.tensor(list(b"3D."))
        state = api.adapt_prompt(
            model,
            prompt[None],
            mask_id=mask_id,
            fast_weights=mem,
            config=loaded.config.memdlm.model_copy(update={"inner_lr": 20.0}),
        )
        exact_on = exact_elbo(model, prompt, response, mask_id, mem, state)
        exact_off = exact_elbo(model, prompt, response, mask_id)
        estimate = api.log_likelihood(
            model, prompt, response[None], mask_id=mask_id, state=state, fast_weights=mem,
            mc_num=1200, mc_batch=300, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
    finally:
        mem.remove()
    tolerance = 0.01  # nats; the estimate's spread over seeds is about 0.002 here
    assert abs(float(estimate[0]) - exact_on) < tolerance
    assert abs(exact_on - exact_off) > 3 * tolerance


# --------------------------------------------------------------------------- generate_until


def test_exact_match_equals_niah_accuracy_on_the_recipes_needles(loaded, tasks):
    """Same model, same sampler (greedy, low confidence, one token per step, answer + EOS
    tokens): lm-eval's exact match and every output equal `niah_accuracy`'s."""
    cfg = loaded.config
    examples = prepare_data(cfg).accuracy_eval
    reference = niah_accuracy(
        loaded.model,
        examples,
        loaded.tokenizer,
        batch_size=cfg.eval.batch_size,
        device=loaded.device,
        generate_options=cfg.generate_options(),
        loss_backend=cfg.loss_backend,
    )
    lm = MemDLMLM.from_loaded(loaded, batch_size=cfg.eval.batch_size)
    names = [f"niah_{task}" for task in sorted({e.task for e in examples})]
    results = evaluate(lm, tasks, names)
    outputs = [
        s["resps"][0][0]
        for name in names
        for s in sorted(results["samples"][name], key=lambda s: s["doc_id"])
    ]
    assert outputs == [s["output"] for s in reference["samples"]]
    hits = sum(
        results["results"][n]["exact_match,none"] * len(results["samples"][n]) for n in names
    )
    (length,) = reference["by_length"]
    assert hits / len(outputs) == pytest.approx(reference["by_length"][length])


def test_cut_at_stops_cuts_at_the_earliest_stop_string():
    assert harness_setup.cut_at_stops("abc. def\nghi", ["\n", "."]) == "abc"
    assert harness_setup.cut_at_stops("abc", ["x", ""]) == "abc"
    assert harness_setup.cut_at_stops("abc", []) == "abc"


def test_stop_strings_cut_the_generation_afterwards(loaded, tmp_path):
    """A stop string cuts the sampled text at its first occurrence, after sampling: the text
    before it is the sampler's own output for the same prompt without stop strings."""
    prompt = "the daisy code is 6Q. daisy code? "
    lm = MemDLMLM.from_loaded(loaded)
    free = lm.sample([list(prompt.encode())], 12, 0.0)[0]
    assert len(free) >= 3  # the seeded model's output (deterministic), long enough to cut
    stop = free[2]
    generation_task(
        tmp_path, "stopped", [{"prompt": prompt, "response": "6Q"}], 12, json.dumps([stop, "@@"])
    )
    got = evaluate(lm, tmp_path, ["stopped"])["samples"]["stopped"][0]["resps"][0][0]
    assert got == free[: free.index(stop)] and got != free


def test_batched_adapted_generation_equals_one_prompt_at_a_time(loaded, tasks):
    """Rows of a batch get their own adapted fast weights: batch 4 gives the outputs of batch 1,
    which are the API's (`adapt_prompt` with the request's seed, then the sampler)."""
    examples = [e for e in prepare_data(loaded.config).accuracy_eval if e.task == "single"]
    one = MemDLMLM.from_loaded(loaded, adapt=True, inner_lr=5.0, batch_size=1)
    four = MemDLMLM.from_loaded(loaded, adapt=True, inner_lr=5.0, batch_size=4)
    names = ["niah_single"]
    by_one = [s["resps"][0][0] for s in evaluate(one, tasks, names)["samples"]["niah_single"]]
    by_four = [s["resps"][0][0] for s in evaluate(four, tasks, names)["samples"]["niah_single"]]
    assert by_one == by_four
    ids = list(examples[0].prompt.encode())
    generator = torch.Generator().manual_seed(request_seed(0, ids, "adapt"))
    state = api.adapt_prompt(
        one.model,
        torch.tensor([ids]),
        mask_id=one.mask_id,
        fast_weights=one.fast_weights,
        config=one.inner,
        generator=generator,
    )
    with one.fast_weights.bind(state):
        out = api.generate(
            one.model, torch.tensor([ids]), mask_id=one.mask_id, gen_length=3, steps=3,
            adapt=False,
        )  # fmt: skip
    assert by_one[0] == one.tokenizer.decode(out[0, len(ids) :].tolist())
    assert one.sample([ids], 3, 0.0)[0] == by_one[0]
    assert state_changes_logits(one, ids, state)  # the adapted weights do act


def state_changes_logits(lm: MemDLMLM, ids: list[int], state) -> bool:
    x = torch.tensor([ids + [lm.mask_id] * 3])
    with torch.no_grad():
        off = lm.model(x)
        with lm.fast_weights.bind(state):
            on = lm.model(x)
    return bool((on - off).abs().max() > 1e-3)


# --------------------------------------------------------------------------- loglikelihood


@pytest.mark.parametrize("adapt", [False, True])
def test_multiple_choice_accuracy_is_the_argmax_of_the_documented_elbo(loaded, tasks, adapt):
    extra = {"adapt": True, "inner_lr": 5.0} if adapt else {}
    lm = MemDLMLM.from_loaded(loaded, mc_num=16, mc_batch=8, **extra)
    results = evaluate(lm, tasks, ["choice"])
    samples = sorted(results["samples"]["choice"], key=lambda s: s["doc_id"])
    hits = 0
    for sample, doc in zip(samples, CHOICES):
        scores = [resp[0][0] for resp in sample["resps"]]
        want = [expected_score(lm, doc["question"], " " + c) for c in doc["choices"]]
        assert scores == pytest.approx(want, rel=1e-9, abs=1e-9)
        hits += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    assert scores_of_duplicates_match(samples[0])  # common random numbers across choices
    assert results["results"]["choice"]["acc,none"] == pytest.approx(hits / len(CHOICES))


def scores_of_duplicates_match(sample) -> bool:
    """CHOICES[0] lists "6Q" twice: the same context, masks and continuation, the same score."""
    return sample["resps"][0][0][0] == sample["resps"][2][0][0]


def test_adaptation_runs_once_per_distinct_context(loaded, monkeypatch):
    calls = []
    real = api.adapt_prompt

    def counting(model, prompt_ids, **kwargs):
        calls.append(tuple(prompt_ids[0].tolist()))
        return real(model, prompt_ids, **kwargs)

    monkeypatch.setattr(api, "adapt_prompt", counting)
    lm = MemDLMLM.from_loaded(loaded, adapt=True, adapt_cache=1, mc_num=4, mc_batch=4)
    # the choices of all items interleaved, as lm-eval may order them
    requests = [
        Instance("loglikelihood", doc, (doc["question"], choice), index)
        for index in range(3)
        for doc in CHOICES
        for choice in doc["choices"][index : index + 1]
    ]
    first = lm.loglikelihood(requests)
    assert len(calls) == len(CHOICES) == len(set(calls))
    again = MemDLMLM.from_loaded(loaded, adapt=True, adapt_cache=8, mc_num=4, mc_batch=4)
    calls.clear()
    assert again.loglikelihood(requests) == first  # order- and cache-independent numbers
    again.loglikelihood(requests)  # all contexts cached now
    assert len(calls) == len(CHOICES)


def test_is_greedy_is_one_step_greedy_unmasking(loaded):
    """is_greedy is True exactly when the sampler, unmasking the whole continuation in one
    greedy step, produces it; lm-eval's requests get the same answer."""
    lm = MemDLMLM.from_loaded(loaded, mc_num=4, mc_batch=4)
    context = "the topaz code is 1Z. topaz code?"
    ids = torch.tensor([list(context.encode())])
    one_step = dd.generate(lm.model, ids, mask_id=lm.mask_id, gen_length=4, steps=1)[0, -4:]
    assert bool(
        harness_setup.greedy_matches(lm.model, ids[0], one_step[None], mask_id=lm.mask_id)[0]
    )
    for position in range(4):
        changed = one_step.clone()
        changed[position] = (changed[position] + 1) % 256
        match = harness_setup.greedy_matches(lm.model, ids[0], changed[None], mask_id=lm.mask_id)
        assert not bool(match[0])
    texts = [" 1Z.", "abcd"]
    results = lm.loglikelihood([Instance("loglikelihood", {}, (context, t), 0) for t in texts])
    for text, (_, is_greedy) in zip(texts, results):
        tokens = torch.tensor([list(text.encode())])
        out = dd.generate(lm.model, ids, mask_id=lm.mask_id, gen_length=4, steps=1)[:, -4:]
        assert is_greedy == bool(torch.equal(out, tokens))


# --------------------------------------------------------------------------- rolling


def test_rolling_is_the_elbo_of_the_whole_text_and_gives_lm_evals_perplexities(loaded, tasks):
    lm = MemDLMLM.from_loaded(loaded, mc_num=8, mc_batch=8, adapt=True)
    results = evaluate(lm, tasks, ["rolling"])
    total_ll, words, nbytes = 0.0, 0, 0
    for sample in sorted(results["samples"]["rolling"], key=lambda s: s["doc_id"]):
        text = TEXTS[sample["doc_id"]]["text"]
        tokens = list(text.encode())
        want = api.log_likelihood(
            lm.model, torch.tensor([], dtype=torch.long), torch.tensor([tokens]),
            mask_id=lm.mask_id, mc_num=8, mc_batch=8,
            generator=torch.Generator().manual_seed(request_seed(0, [-1, *tokens], "rolling")),
        )  # fmt: skip
        assert sample["resps"][0][0] == pytest.approx(float(want[0]), rel=1e-12)
        total_ll += float(want[0])
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode())
    metrics = results["results"]["rolling"]
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-total_ll / words))
    assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(-total_ll / nbytes))
    assert lm.adaptations == 0  # nothing to adapt to: the context is empty


def test_rolling_windows_partition_long_texts():
    tokens = list(range(23))
    assert harness_setup.rolling_windows(tokens, 32) == [([], tokens)]
    windows = harness_setup.rolling_windows(tokens, 10)
    assert [t for _, chunk in windows for t in chunk] == tokens
    for prompt, chunk in windows:
        assert len(prompt) + len(chunk) <= 10 and len(chunk) == 5 or chunk == tokens[20:]
        start = tokens.index(chunk[0])
        assert prompt == tokens[start - len(prompt) : start]
    assert windows[1][0] == tokens[:5] and windows[-1][0] == tokens[13:20]


# --------------------------------------------------------------------------- command line


def test_the_harness_command_is_lm_evals_cli_with_memdlm_registered(run_dir, tasks, tmp_path):
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "recipes.memdlm", "harness",
        "--model", "memdlm", "--model_args", f"run={run_dir},mc_num=4,mc_batch=4,adapt=true",
        "--tasks", "niah_single,choice,rolling", "--include_path", str(tasks),
        "--limit", "2", "--output_path", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.rglob("results_*.json")
    saved = json.loads(path.read_text())
    assert saved["config"]["model"] == "memdlm"
    assert set(saved["results"]) == {"niah_single", "choice", "rolling"}
    assert 0 <= saved["results"]["choice"]["acc,none"] <= 1
    assert saved["results"]["rolling"]["word_perplexity,none"] > 1

    bad = [*command[:6], "--model_args", f"run={run_dir},mc_numm=4", *command[8:]]
    result = subprocess.run(bad, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: memdlm model_args: unknown")
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- Hugging Face


def test_a_hugging_face_backbone_through_pretrained(tmp_path, tasks):
    pytest.importorskip("transformers")
    from tests.recipes.backbones.test_hf import build

    folder = build("bert", tmp_path / "bert")
    lm = MemDLMLM(
        pretrained=str(folder), device="cpu", adapt=True, rank=4, inner_lr=1.0, mc_num=4,
        mc_batch=4,
    )  # fmt: skip
    results = evaluate(lm, tasks, ["choice", "niah_single"], limit=2)
    for sample in results["samples"]["choice"]:
        doc = CHOICES[sample["doc_id"]]
        scores = [resp[0][0] for resp in sample["resps"]]
        want = [expected_score(lm, doc["question"], " " + c) for c in doc["choices"]]
        assert scores == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert lm.adaptations == 2 + 2  # two choice contexts, two generation prompts
    for sample in results["samples"]["niah_single"]:
        assert isinstance(sample["resps"][0][0], str)
