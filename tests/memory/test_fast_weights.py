"""The binding mechanism shared by FastLoRA and FullFastWeights: exact restore, errors,
gradients (finite differences), torch.func.grad / vmap, torch.compile and bf16 autocast."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffusion as dd
import memory as mm
from tests.memory.helpers import (
    Associative,
    association_task,
    randomize,
    recall_loss,
    tiny_model,
    tokens,
)

FFN = ("gate_proj", "up_proj", "down_proj")
KINDS = {
    "lora": lambda model, targets: mm.FastLoRA(model, targets, rank=3, alpha=6.0),
    "full": lambda model, targets: mm.FullFastWeights(model, targets),
}


def attach(kind, model, fraction=0.5):
    return KINDS[kind](model, mm.last_layers(model, fraction))


def bound_forward(memory, model):
    def forward(state, x):
        with memory.bind(state):
            return model(x)

    return forward


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, saved):
    current = model.state_dict()
    assert list(current) == list(saved)
    assert all(torch.equal(current[k], saved[k]) for k in saved)


# ------------------------------------------------------------------------ exact restore
@pytest.mark.parametrize("kind", KINDS)
def test_leaving_bind_restores_the_model_exactly(kind):
    model = tiny_model()
    x = tokens(2, 6)
    bare, saved = model(x), snapshot(model)
    mem = attach(kind, model)
    assert torch.equal(model(x), bare)  # attached but unbound: the bare model
    state = randomize(mem.init())
    with mem.bind(state):
        assert mem.is_bound
        assert not torch.allclose(model(x), bare)
    assert not mem.is_bound
    assert torch.equal(model(x), bare)
    assert_bit_identical(model, saved)


@pytest.mark.parametrize("kind", KINDS)
def test_leaving_bind_through_an_exception_restores_the_model(kind):
    model = tiny_model()
    x = tokens(2, 6)
    bare = model(x)
    mem = attach(kind, model)
    with pytest.raises(KeyError, match="boom"), mem.bind(randomize(mem.init())):
        model(x)
        raise KeyError("boom")
    assert not mem.is_bound and torch.equal(model(x), bare)
    # An error raised by the hook itself (wrong input batch) also unbinds.
    with pytest.raises(ValueError, match="batch size 3"), mem.bind(mem.init(batch_size=3)):
        model(x)
    assert not mem.is_bound and torch.equal(model(x), bare)


def test_the_attachment_lives_as_long_as_the_memory_and_remove_detaches_early():
    """No caller needs `remove()`: dropping the memory takes its hooks off the model. The
    optional `remove()` does it at once (idempotent) and blocks later binds. `bindings` reads
    the open bindings from the model's hooks: none outside `bind`."""
    model = tiny_model()
    x = tokens(2, 6)
    bare = model(x)
    targets = mm.last_layers(model, 0.5)

    def hook_counts():
        return {t: len(model.get_submodule(t)._forward_hooks) for t in targets}

    before = hook_counts()
    mem = mm.FastLoRA(model, targets, rank=2)
    assert hook_counts() == {t: n + 1 for t, n in before.items()}
    assert mm.bindings(model) == ()
    state = randomize(mem.init())
    with mem.bind(state) as binding:
        assert mm.bindings(model) == (binding,) and binding.memory is mem
        assert binding.batch_size is None
        with pytest.raises(RuntimeError, match="remove"):
            mem.remove()  # not while bound
    assert mm.bindings(model) == ()
    del mem, binding
    gc.collect()
    assert hook_counts() == before and torch.equal(model(x), bare)

    mem = mm.FastLoRA(model, targets, rank=2)
    mem.remove()
    mem.remove()  # idempotent
    assert hook_counts() == before
    assert torch.equal(model(x), bare)
    with pytest.raises(RuntimeError, match="after remove"):
        mem.bind(state)


def test_two_memories_on_one_target_add_their_corrections():
    model = Associative(6).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    lora = mm.FastLoRA(model, ["proj"], rank=2, alpha=2.0)
    full = mm.FullFastWeights(model, ["proj"])
    lora_state = randomize(lora.init(dtype=torch.float64))
    full_state = randomize(full.init(dtype=torch.float64), seed=3)
    with lora.bind(lora_state), full.bind(full_state):
        both = model(x)
    weight = lora.merged_weight("proj", lora_state) + full_state["proj.delta"]
    torch.testing.assert_close(both, x @ weight.T, rtol=1e-12, atol=1e-14)


def test_a_linear_called_with_a_keyword_input_is_corrected_too():
    model = Associative(5).double()
    x = torch.randn(3, 5, dtype=torch.float64)
    mem = mm.FullFastWeights(model, ["proj"])
    state = randomize(mem.init(dtype=torch.float64))
    with mem.bind(state):
        torch.testing.assert_close(model.proj(input=x), x @ mem.merged_weight("proj", state).T)


def test_on_the_diffusion_reference_transformer():
    """MemDLM's layout on `diffusion.Transformer`: init is a no-op, a bound state equals the
    merged weights, per-sample equals the loop, and leaving restores the model."""
    model = dd.Transformer(11, d_model=16, n_layers=4, n_heads=2, d_ff=24, max_seq_len=8)
    model = model.double().eval()
    x = tokens(2, 6, vocab=11)
    bare, saved = model(x), snapshot(model)
    names = mm.last_layers(model, 0.1)
    assert names == [f"layers.3.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    mem = mm.FastLoRA(model, names, rank=4, alpha=8.0)
    with mem.bind(mem.init(batch_size=2)):
        assert torch.equal(model(x), bare)
    state = randomize(mem.init(batch_size=2, dtype=torch.float64), scale=0.5)
    with mem.bind(state):
        batched = model(x)
    for b in range(2):
        merged = {n: mem.merged_weight(n, state)[b] for n in names}
        with torch.no_grad():
            originals = {n: model.get_submodule(n).weight.clone() for n in names}
            for n in names:
                model.get_submodule(n).weight.copy_(merged[n])
            expected = model(x[b : b + 1])
            for n in names:
                model.get_submodule(n).weight.copy_(originals[n])
        torch.testing.assert_close(batched[b : b + 1], expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(model(x), bare)
    assert_bit_identical(model, saved)


# ------------------------------------------------------------------------------ errors
def test_constructor_rejects_bad_targets():
    model = tiny_model()
    for kind in KINDS:
        make = KINDS[kind]
        with pytest.raises(ValueError, match="unknown target 'layers.9.mlp.up_proj'"):
            make(model, ["layers.9.mlp.up_proj"])
        with pytest.raises(ValueError, match="'layers.0.mlp' is a SwiGLU, not an nn.Linear"):
            make(model, ["layers.0.mlp"])
        with pytest.raises(ValueError, match="RMSNorm, not an nn.Linear"):
            make(model, ["norm"])
        with pytest.raises(ValueError, match="listed twice"):
            make(model, ["lm_head", "lm_head"])
        with pytest.raises(ValueError, match="empty"):
            make(model, [])
        with pytest.raises(ValueError, match="non-empty strings"):
            make(model, [""])
        with pytest.raises(TypeError, match="got the string 'lm_head'"):
            make(model, "lm_head")
        with pytest.raises(TypeError, match="nn.Module"):
            make("model", ["lm_head"])
    shared = nn.Module()
    shared.a = shared.b = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="same module"):
        mm.FullFastWeights(shared, ["a", "b"])


def test_bind_rejects_a_state_from_another_memory():
    model = tiny_model()
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.25), rank=2)
    other_targets = mm.FastLoRA(tiny_model(), mm.last_layers(model, 0.5), rank=2)
    with pytest.raises(ValueError, match=r"does not belong .* unexpected keys \['layers.2"):
        mem.bind(other_targets.init())
    full = mm.FullFastWeights(tiny_model(), mm.last_layers(model, 0.25))
    with pytest.raises(ValueError, match=r"missing keys \['layers.3.mlp.gate_proj.A'"):
        mem.bind(full.init())
    other_rank = mm.FastLoRA(tiny_model(), mm.last_layers(model, 0.25), rank=3)
    with pytest.raises(ValueError, match=r"'layers.3.mlp.gate_proj.A'\] has shape \(3, 16\); "):
        mem.bind(other_rank.init())


def test_bind_rejects_wrong_shapes_dtypes_devices_and_containers():
    model = tiny_model()
    mem = mm.FastLoRA(model, ["lm_head"], rank=2)
    good = mem.init()
    with pytest.raises(ValueError, match=r"expected \(2, 16\) \(shared\) or \(batch, 2, 16\)"):
        mem.bind({**good, "lm_head.A": torch.zeros(2, 2, 16, 1)})
    with pytest.raises(TypeError, match=r"'lm_head.B'\] has dtype torch.int64"):
        mem.bind({**good, "lm_head.B": torch.zeros(13, 2, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"'lm_head.B'\] must be a Tensor"):
        mem.bind({**good, "lm_head.B": [[0.0] * 2] * 13})
    with pytest.raises(ValueError, match="disagree on the batch dimension"):
        mem.bind({**good, "lm_head.B": torch.zeros(4, 13, 2)})
    with pytest.raises(ValueError, match="disagree on the batch dimension"):
        mem.bind({"lm_head.A": torch.zeros(3, 2, 16), "lm_head.B": torch.zeros(4, 13, 2)})
    with pytest.raises(ValueError, match="is on meta but the target weight is on cpu"):
        mem.bind({**good, "lm_head.A": torch.zeros(2, 16, device="meta")})
    with pytest.raises(TypeError, match="mapping"):
        mem.bind(list(good.values()))
    with pytest.raises(ValueError, match="does not belong"):
        mem.merged_weight("lm_head", {})


def test_per_sample_state_needs_a_matching_input_batch():
    model = tiny_model()
    mem = mm.FastLoRA(model, ["layers.3.mlp.up_proj"], rank=2)
    with (
        mem.bind(mem.init(batch_size=4)),
        pytest.raises(
            ValueError,
            match=r"'layers.3.mlp.up_proj' got input of shape \(2, 5, 16\).*leading dim must be 4",
        ),
    ):
        model(tokens(2, 5))
    with mem.bind(mem.init(batch_size=4)), pytest.raises(ValueError, match="leading dim"):
        model.layers[3].mlp.up_proj(torch.zeros(16))  # no batch dim at all


def test_nested_bind_is_an_error_and_keeps_the_outer_state():
    model = tiny_model()
    x = tokens(2, 5)
    mem = mm.FastLoRA(model, mm.last_layers(model), rank=2)
    outer, inner = randomize(mem.init()), randomize(mem.init(), seed=9)
    with mem.bind(outer):
        expected = model(x)
        with pytest.raises(RuntimeError, match="nested bind"), mem.bind(inner):
            pass
        assert torch.equal(model(x), expected)


# ------------------------------------------------------------------- gradients, torch.func
def gradcheck_setup(kind, batch_size, dtype=torch.float64):
    """A float64 model, its state from `init(dtype=dtype)` and a function of that state."""
    model = tiny_model(torch.float64, vocab=7, dim=8, hidden=12, num_layers=2)
    # A full delta has out * in entries per target: one target keeps the Jacobian small.
    targets = mm.last_layers(model, 0.5, modules=("down_proj",) if kind == "full" else FFN)
    mem = KINDS[kind](model, targets)
    state = randomize(mem.init(batch_size=batch_size, dtype=dtype))
    keys = list(state)
    x = tokens(2, 4, vocab=7)
    readout = torch.randn(4, 2 * 4 * 7, dtype=torch.float64)  # 4 fixed projections of logits

    def fn(*tensors):
        with mem.bind(dict(zip(keys, tensors))):
            return readout @ model(x).flatten()

    return fn, tuple(state[k].requires_grad_() for k in keys)


@pytest.mark.parametrize(("kind", "batch_size"), [("lora", None), ("lora", 2), ("full", 2)])
def test_gradients_wrt_the_state_match_finite_differences(kind, batch_size):
    fn, inputs = gradcheck_setup(kind, batch_size)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("kind", "batch_size"), [("lora", None), ("lora", 2), ("full", None)])
def test_a_float64_model_gets_a_float64_state_that_passes_gradcheck_by_default(kind, batch_size):
    """No dtype argument: the state follows the float64 model, so finite differences at
    eps=1e-6 agree with autograd to 1e-7 (a float32 state fails this same check)."""
    fn, inputs = gradcheck_setup(kind, batch_size, dtype=None)
    assert all(t.dtype == torch.float64 for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_torch_func_grad_over_a_binding_function_equals_autograd():
    model = tiny_model(torch.float64)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=3)
    state = randomize(mem.init(batch_size=2, dtype=torch.float64))
    x, y = tokens(2, 5), tokens(2, 5, seed=4)

    def loss(s):
        with mem.bind(s):
            return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    functional = torch.func.grad(loss)(state)
    leaves = {k: v.clone().requires_grad_() for k, v in state.items()}
    imperative = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for key, g in zip(leaves, imperative):
        torch.testing.assert_close(functional[key], g, rtol=1e-12, atol=1e-15)
        assert g.abs().sum() > 0


def per_sample_inner_sgd(mem, model, lr, steps):
    """One inner loop per sample, three ways: vmap over samples, a Python loop over samples,
    and one batched state whose summed loss gives each sample its own gradient."""

    def sample_loss(state, x, y):  # unbatched state, x and y (L,)
        with mem.bind(state):
            return F.cross_entropy(model(x[None])[0], y)

    def adapt(state, x, y):
        for _ in range(steps):
            grads = torch.func.grad(sample_loss)(state, x, y)
            state = {k: v - lr * grads[k] for k, v in state.items()}
        return state

    def batched_loss(state, x, y):  # batched state, x and y (B, L)
        with mem.bind(state):
            logits = model(x)
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1).sum()

    def adapt_batched(state, x, y):
        for _ in range(steps):
            grads = torch.func.grad(batched_loss)(state, x, y)
            state = {k: v - lr * grads[k] for k, v in state.items()}
        return state

    return adapt, adapt_batched


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_over_per_sample_inner_sgd_equals_the_loop_and_the_batched_state(kind):
    model = tiny_model(torch.float64)
    mem = attach(kind, model)
    start = randomize(mem.init(dtype=torch.float64), scale=0.2)
    x, y = tokens(3, 5), tokens(3, 5, seed=5)
    adapt, adapt_batched = per_sample_inner_sgd(mem, model, lr=0.5, steps=2)

    vmapped = torch.func.vmap(adapt, in_dims=(None, 0, 0))(start, x, y)
    looped = [adapt(start, x[b], y[b]) for b in range(3)]
    batched = adapt_batched({k: v.expand(3, *v.shape) for k, v in start.items()}, x, y)
    for key in start:
        by_loop = torch.stack([s[key] for s in looped])
        torch.testing.assert_close(vmapped[key], by_loop, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batched[key], by_loop, rtol=1e-10, atol=1e-12)
        assert not torch.allclose(by_loop[0], by_loop[1])  # samples really adapted apart


def test_vmap_of_the_bound_forward_equals_the_per_sample_state():
    model = tiny_model(torch.float64)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=3)
    state = randomize(mem.init(batch_size=3, dtype=torch.float64))
    x = tokens(3, 5)
    forward = bound_forward(mem, model)
    vmapped = torch.func.vmap(lambda s, t: forward(s, t[None])[0])(state, x)
    torch.testing.assert_close(vmapped, forward(state, x), rtol=1e-12, atol=1e-14)


def test_a_learned_initial_state_gets_exact_second_order_gradients():
    """The state is just tensors: make the initial state parameters and differentiate the
    post-adaptation loss through one inner SGD step (MAML-style), checked by gradcheck."""
    keys, values = association_task(num_pairs=4, dim=6, seed=2)
    model = Associative(6).double()
    mem = mm.FastLoRA(model, ["proj"], rank=2, alpha=2.0)
    init = {k: nn.Parameter(v) for k, v in randomize(mem.init(dtype=torch.float64)).items()}

    def post_adaptation_loss(a, b):
        state = {"proj.A": a, "proj.B": b}
        with mem.bind(state):
            inner = recall_loss(model(keys), values)
        grads = torch.autograd.grad(inner, (a, b), create_graph=True)
        adapted = {"proj.A": a - 0.5 * grads[0], "proj.B": b - 0.5 * grads[1]}
        with mem.bind(adapted):
            return recall_loss(model(keys), values)

    assert torch.autograd.gradcheck(post_adaptation_loss, (init["proj.A"], init["proj.B"]))
    post_adaptation_loss(init["proj.A"], init["proj.B"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in init.values())


# --------------------------------------------------------------------- mixed precision
def test_bf16_autocast_keeps_the_state_float32_and_computes_in_bf16():
    model = tiny_model()
    x = tokens(2, 6)
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=4)
    state = {k: v.requires_grad_() for k, v in randomize(mem.init(), scale=0.5).items()}
    seen = []
    for name in mem.targets:  # registered after ours: sees the corrected output
        model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out.dtype))

    with torch.autocast("cpu", dtype=torch.bfloat16), mem.bind(state):
        low = model(x).float()
    with mem.bind(state):
        high = model(x)
    grads = torch.autograd.grad(low.logsumexp(-1).mean(), list(state.values()))

    targets = len(mem.targets)  # bf16 under autocast (no upcast to the state's float32)
    assert seen == [torch.bfloat16] * targets + [torch.float32] * targets
    assert all(v.dtype == torch.float32 for v in state.values())
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    torch.testing.assert_close(low, high, rtol=0.05, atol=0.05)  # bf16 has 8 mantissa bits


def test_a_bf16_model_with_a_float32_state_runs_in_bf16():
    model = tiny_model(torch.bfloat16)
    mem = mm.FullFastWeights(model, mm.last_layers(model))
    state = {k: v.requires_grad_() for k, v in randomize(mem.init(), scale=0.05).items()}
    with mem.bind(state):
        logits = model(tokens(2, 6))
    assert logits.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(logits.float().sum(), [state["layers.3.mlp.down_proj.delta"]])
    assert grad.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_size", [None, 3])
@pytest.mark.parametrize(
    ("model_dtype", "expected"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_init_defaults_to_the_weight_dtype_promoted_to_at_least_float32(
    kind, batch_size, model_dtype, expected
):
    model = tiny_model(model_dtype)
    mem = attach(kind, model)
    state = mem.init(batch_size=batch_size, generator=torch.Generator().manual_seed(4))
    assert {v.dtype for v in state.values()} == {expected}
    # the default is exactly `dtype=expected`: same draws from the same generator
    explicit = mem.init(batch_size, torch.Generator().manual_seed(4), dtype=expected)
    assert all(torch.equal(state[k], explicit[k]) for k in state)


def test_init_picks_the_dtype_per_target_and_an_explicit_dtype_wins():
    model = nn.ModuleDict(
        {
            "bf16": nn.Linear(4, 3).to(torch.bfloat16),
            "fp16": nn.Linear(4, 3).to(torch.float16),
            "fp32": nn.Linear(4, 3),
            "fp64": nn.Linear(4, 3).double(),
        }
    )
    expected = {
        "bf16": torch.float32,
        "fp16": torch.float32,
        "fp32": torch.float32,
        "fp64": torch.float64,
    }
    for kind in KINDS:
        mem = KINDS[kind](model, list(model))
        state = mem.init(batch_size=2)
        assert {k: v.dtype for k, v in state.items()} == {
            key: expected[key.split(".")[0]] for key in mem.state_shapes
        }
        for dtype in (torch.float64, torch.bfloat16):
            assert {v.dtype for v in mem.init(dtype=dtype).values()} == {dtype}
        # each target computes in its own activation dtype with its promoted state
        state = randomize(state)
        for name, linear in model.items():
            x = torch.randn(2, 5, 4, dtype=torch.float64).to(linear.weight.dtype)
            with mem.bind(state):
                out = linear(x)
            merged = mem.merged_weight(name, state).to(linear.weight.dtype)
            tolerance = 1e-12 if name == "fp64" else 2e-2
            expected_out = torch.einsum("bli,boi->blo", x, merged) + linear.bias
            torch.testing.assert_close(out, expected_out, atol=tolerance, rtol=tolerance)
        with pytest.raises(TypeError, match="dtype must be None or a floating-point"):
            mem.init(dtype=torch.int64)
        mem.remove()


# ----------------------------------------------------------------------- torch.compile
def small_reference_transformer():
    model = dd.Transformer(11, d_model=16, n_layers=4, n_heads=2, d_ff=24, max_seq_len=8)
    return model.eval()


@pytest.mark.slow
def test_the_bound_forward_compiles_without_graph_breaks():
    """`with mem.bind(state): model(x)` traced by dynamo on the reference transformer: one
    graph and no break, for a shared and for a per-sample state."""
    torch._dynamo.reset()
    model = small_reference_transformer()
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=4)
    forward = bound_forward(mem, model)
    for batch_size in (None, 2):
        state = randomize(mem.init(batch_size=batch_size))
        explanation = torch._dynamo.explain(forward)(state, tokens(2, 6, vocab=11))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    assert not mem.is_bound


@pytest.mark.slow
def test_a_compiled_model_follows_bind_and_unbind():
    """The reference transformer compiled once (fullgraph) is guarded on the binding: bound
    calls match eager, later unbound calls are the bare model again, and gradients reach the
    state through the compiled backward."""
    torch._dynamo.reset()
    model = small_reference_transformer()
    mem = mm.FastLoRA(model, mm.last_layers(model, 0.5), rank=4)
    state = {k: v.requires_grad_() for k, v in randomize(mem.init(batch_size=2)).items()}
    x = tokens(2, 6, vocab=11)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    bare = model(x)
    with mem.bind(state):
        eager_bound, compiled_bound = model(x), compiled(x)
    torch.testing.assert_close(compiled_bound, eager_bound, rtol=1e-5, atol=1e-6)
    assert (eager_bound - bare).abs().max() > 1e-3
    torch.testing.assert_close(compiled(x), bare, rtol=1e-5, atol=1e-6)
    eager_grads = torch.autograd.grad(eager_bound.sum(), list(state.values()))
    compiled_grads = torch.autograd.grad(compiled_bound.sum(), list(state.values()))
    for eager, comp in zip(eager_grads, compiled_grads):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
