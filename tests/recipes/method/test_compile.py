"""torch.compile on CPU: the standard step, the MemDLM step (inner loop included) and the sampler
step trace without graph breaks, do not recompile in the steady state, and match eager.

Dynamo's graph-break count comes from `torch._dynamo.explain`; recompiles from a counting
backend. The compiled runs use the "aot_eager" backend (AOTAutograd traces forward and backward,
no C++ code generation), which keeps these tests in seconds; inductor is measured in
`benchmarks/bench_compile.py`.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import diffusion as dd
from recipes.memdlm import method
from recipes.memdlm.backbones import adapter
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch
from tests.recipes.method.test_step import memdlm_step

pytestmark = pytest.mark.slow

MASK_ID, VOCAB = 29, 30


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> dd.Transformer:
    torch.manual_seed(0)
    return dd.Transformer(VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=64)


def _batch(seed: int) -> tuple[Batch, method.Anchor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK_ID, (4, 24), generator=g)
    prompt_lengths = torch.tensor([8, 10, 6, 12])
    maskable = torch.arange(24)[None, :] >= prompt_lengths[:, None]
    batch = Batch(x0, maskable, prompt_lengths)
    anchor = method.sample_anchor(batch, mask_id=MASK_ID, eps=1e-3, generator=g)
    return batch, anchor


CFG = MemDLMConfig(rank=4, alpha=8.0, layer_fraction=0.5, inner_lr=0.5)


def _explain(fn, *args):
    out = torch._dynamo.explain(fn)(*args)
    reasons = [f"{r.reason.splitlines()[0]} at {r.user_stack[-1:]}" for r in out.break_reasons]
    return out.graph_break_count, out.graph_count, reasons


def test_training_steps_trace_without_graph_breaks():
    model = _model()
    batch, anchor = _batch(0)
    backbone = adapter(model)
    breaks, graphs, reasons = _explain(method.standard_loss, backbone, batch, anchor)
    assert (breaks, graphs) == (0, 1), reasons

    memdlm = method.MemDLM.on(backbone, CFG, mask_id=MASK_ID)
    draws = memdlm.draw_after(batch, anchor, torch.Generator().manual_seed(1))
    breaks, graphs, reasons = _explain(method.memdlm_core, memdlm, backbone, draws, True)
    assert (breaks, graphs) == (0, 1), reasons
    memdlm.close()


def _grads(model):
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("per_sample", [False, True])
def test_compiled_memdlm_step_matches_eager_and_does_not_recompile(per_sample):
    cfg = CFG.model_copy(update={"per_sample": per_sample})
    model = _model()
    mem = method.make_fast_weights(model, cfg)
    counter = CompileCounterWithBackend("aot_eager")
    compiler = lambda fn: torch.compile(fn, backend=counter)  # noqa: E731
    frames = []
    for seed in range(3):  # new anchors: other mask counts and ratios, the same shapes
        batch, anchor = _batch(seed)
        outs = {}
        for name, steps in (("eager", None), ("compiled", compiler)):
            out = memdlm_step(
                model,
                mem,
                batch,
                anchor,
                cfg,
                mask_id=MASK_ID,
                generator=torch.Generator().manual_seed(seed),
                log_gap=True,
                compiler=steps,
            )
            out.loss.backward()
            outs[name] = (out, _grads(model))
        (eager, eager_grads), (ours, our_grads) = outs["eager"], outs["compiled"]
        torch.testing.assert_close(ours.loss, eager.loss, rtol=1e-5, atol=1e-6)
        assert ours.metrics.keys() == eager.metrics.keys()
        for key, value in eager.metrics.items():
            assert ours.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        for name, grad in eager_grads.items():
            torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        frames.append(counter.frame_count)
    assert frames[0] == 1 and frames[-1] == frames[0], frames  # one graph, no recompiles
    mem.remove()


def test_compiled_standard_step_matches_eager_and_does_not_recompile():
    model = _model()
    counter = CompileCounterWithBackend("aot_eager")
    standard = method.Standard(MASK_ID)
    compiled = standard.compiled(lambda fn: torch.compile(fn, backend=counter))
    backbone = adapter(model)
    for seed in range(3):
        batch, anchor = _batch(seed)
        draws = method.Draws(batch, anchor)
        eager, _ = standard.loss(backbone, draws)
        eager.backward()
        eager_grads = _grads(model)
        ours, _ = compiled.loss(backbone, draws)
        ours.backward()
        torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-6)
        for name, grad in _grads(model).items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert counter.frame_count == 1


def test_compiled_sampler_step_has_no_graph_breaks_and_matches_eager():
    model = _model().eval()
    prompt = torch.randint(0, MASK_ID, (3, 8), generator=torch.Generator().manual_seed(0))
    counter = CompileCounterWithBackend("eager")
    kwargs = dict(mask_id=MASK_ID, gen_length=16, steps=8, block_length=4, threshold=0.3)
    ours = dd.generate(
        model, prompt, compiler=lambda fn: torch.compile(fn, backend=counter), **kwargs
    )
    assert torch.equal(ours, dd.generate(model, prompt, **kwargs))
    # Two compiled functions (model call, commit); the commit's block offset becomes dynamic
    # after the second block, so at most one recompile each, then none for the other blocks.
    assert counter.frame_count <= 4, counter.frame_count

    from diffusion import sampling

    x = torch.cat([prompt, torch.full((3, 16), MASK_ID)], dim=1)
    breaks, _, reasons = _explain(sampling._call_model, model, x, None, MASK_ID, None)
    assert breaks == 0, reasons
    with torch.no_grad():
        logits = model(x)
    cfg = sampling._StepConfig(MASK_ID, None, 1.0, "margin", None, False, 8)
    noise = torch.rand(3, 4, VOCAB, dtype=torch.float64)
    candidates = x[:, 8:12] == MASK_ID
    count = torch.tensor([1, 1, 1])
    breaks, _, reasons = _explain(
        sampling._dense_commit, logits, x, 8, 12, candidates, count, noise, None, cfg
    )
    assert breaks == 0, reasons


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_inductor_compiled_commit_equals_the_eager_commit(threshold):
    """A real inductor build of the sampler's commit step (it once miscompiled a scatter-based
    ranking: every candidate came out chosen)."""
    from diffusion import sampling

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, MASK_ID, (3, 24), generator=g)
    x[:, 8:] = MASK_ID
    x[0, 10] = 3  # one committed position inside the block
    logits = 4 * torch.randn(3, 24, VOCAB, generator=g)
    candidates = x[:, 8:16] == MASK_ID
    count = torch.tensor([2, 1, 3])
    noise = torch.rand(3, 8, VOCAB, generator=g, dtype=torch.float64)
    cfg = sampling._StepConfig(MASK_ID, None, 1.0, "low_confidence", threshold, False, 8)
    args = (logits, x, 8, 16, candidates, count, noise, None, cfg)
    ours = torch.compile(sampling._dense_commit)(*args)
    eager = sampling._dense_commit(*args)
    for name in ("x", "predicted", "chosen"):
        assert torch.equal(getattr(ours, name), getattr(eager, name)), name
    torch.testing.assert_close(ours.confidence, eager.confidence)
    if threshold is None:
        assert ours.chosen.sum(1).tolist() == [2, 1, 3]
