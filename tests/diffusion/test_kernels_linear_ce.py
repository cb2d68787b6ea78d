"""The fused linear cross-entropy: closed-form gradients, the chunked reference against dense
autograd (float64), the Triton row kernel against the reference (fp32, Triton's interpreter on
CPU), the masked loss from hidden states against `masked_diffusion_loss`, and the memory claim
(no tensor as large as the full logits is ever created)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import diffusion as dd
from diffusion.kernels import linear_ce
from diffusion.kernels.dispatch import triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _problem(rows=11, dim=8, vocab=37, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=g)
    row_weight = torch.rand(rows, generator=g, dtype=dtype).add_(0.5).requires_grad_()
    return hidden, weight, targets, row_weight


def _dense(hidden, weight, targets, row_weight):
    """The definition, through autograd: sum_i w_i CE(W h_i, y_i)."""
    ce = F.cross_entropy(hidden @ weight.T, targets, reduction="none")
    return (ce * row_weight).sum()


def _grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def test_reference_rows_give_ce_and_the_closed_form_logit_gradient():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 9, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 8, 3, 3, 5])
    w = torch.tensor([1.0, 0.5, 2.0, 0.0, 3.0], dtype=torch.float64)
    work = logits.clone()
    ce = linear_ce.reference_rows(work, targets, w, True)
    torch.testing.assert_close(ce, F.cross_entropy(logits, targets, reduction="none"))
    expected = w[:, None] * (logits.softmax(-1) - F.one_hot(targets, 9))  # w (p - e_y)
    torch.testing.assert_close(work, expected, rtol=1e-12, atol=1e-15)
    untouched = logits.clone()
    linear_ce.reference_rows(untouched, targets, w, False)
    assert torch.equal(untouched, logits)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 11, 64])
def test_chunked_reference_matches_dense_autograd_in_float64(chunk_size):
    hidden, weight, targets, row_weight = _problem()
    fused = dd.kernels.linear_cross_entropy(
        hidden, weight, targets, row_weight, backend="reference", chunk_size=chunk_size
    )
    dense = _dense(hidden, weight, targets, row_weight)
    torch.testing.assert_close(fused, dense, rtol=1e-13, atol=0)
    scale = 1.7  # the backward scales the stored gradients by the incoming gradient
    for ours, theirs in zip(
        _grads(scale * fused, hidden, weight, row_weight),
        _grads(scale * dense, hidden, weight, row_weight),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_reference_passes_gradcheck():
    hidden, weight, targets, row_weight = _problem(rows=5, dim=3, vocab=7)

    def fn(h, w, rw):
        return dd.kernels.linear_cross_entropy(h, w, targets, rw, backend="reference", chunk_size=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, row_weight))


def test_reference_works_under_torch_func_grad():
    hidden, weight, targets, row_weight = _problem()
    grad_h = torch.func.grad(
        lambda h: dd.kernels.linear_cross_entropy(
            h, weight.detach(), targets, row_weight.detach(), backend="reference", chunk_size=3
        )
    )(hidden.detach())
    expected = _grads(_dense(hidden, weight.detach(), targets, row_weight.detach()), hidden)[0]
    torch.testing.assert_close(grad_h, expected, rtol=1e-12, atol=1e-14)


def test_no_rows_give_zero_loss_and_zero_gradients():
    hidden, weight, targets, row_weight = _problem(rows=0)
    loss = dd.kernels.linear_cross_entropy(hidden, weight, targets, row_weight)
    assert loss.item() == 0.0
    grad_h, grad_w = _grads(loss, hidden, weight)
    assert grad_h.shape == (0, 8) and not grad_w.any()


def test_without_grad_the_forward_skips_the_gradient_work():
    hidden, weight, targets, row_weight = _problem()
    with torch.no_grad():
        loss = dd.kernels.linear_cross_entropy(hidden, weight, targets, row_weight)
    torch.testing.assert_close(loss, _dense(hidden, weight, targets, row_weight).detach())


def test_a_constant_weight_skips_the_weight_gradient_product(monkeypatch):
    """A weight that needs no gradient (the first-order inner loss's detached head): the hidden
    rows' gradient is the dense one, and the (V, D) weight-gradient product is never formed."""
    hidden, weight, targets, row_weight = _problem(rows=23)
    calls = []
    accumulate = linear_ce._accumulate
    monkeypatch.setattr(linear_ce, "_accumulate", lambda *a: calls.append(1) or accumulate(*a))
    constant = weight.detach()
    loss = dd.kernels.linear_cross_entropy(hidden, constant, targets, row_weight, chunk_size=5)
    (grad_h,) = _grads(loss, hidden)
    assert calls == []
    (expected,) = _grads(_dense(hidden, constant, targets, row_weight), hidden)
    torch.testing.assert_close(grad_h, expected, rtol=1e-12, atol=1e-12)
    loss = dd.kernels.linear_cross_entropy(hidden, weight, targets, row_weight, chunk_size=5)
    assert len(calls) == 5  # one product per chunk when the weight needs its gradient


class _LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_peak_tensor_is_one_chunk_of_logits_not_all_of_them():
    rows, dim, vocab, chunk = 64, 8, 512, 4
    hidden, weight, targets, row_weight = _problem(rows, dim, vocab, dtype=torch.float32)
    with _LargestAllocation() as probe:
        loss = dd.kernels.linear_cross_entropy(
            hidden, weight, targets, row_weight, backend="reference", chunk_size=chunk
        )
        loss.backward()
    # The weight gradient (V, D) and one (C, V) chunk are the largest tensors; the full logits
    # would be rows * vocab = 32768 elements.
    assert probe.largest == max(vocab * dim, chunk * vocab) < rows * vocab
    with _LargestAllocation() as dense_probe:
        _dense(hidden, weight, targets, row_weight).backward()
    assert dense_probe.largest == rows * vocab  # the probe does see a full logits tensor


def test_default_chunk_follows_liger_rule_above_a_floor():
    assert linear_ce.default_chunk_rows(8192, 126_464, 4096, min_rows=1) == 512
    assert linear_ce.default_chunk_rows(8192, 126_464, 4096, min_rows=1024) == 1024
    assert linear_ce.default_chunk_rows(100, 50, 64) == 100  # V <= D: one chunk
    assert linear_ce.default_chunk_rows(512, 126_464, 256) == 128  # the floor
    assert linear_ce.default_chunk_rows(0, 10, 4) == 1


def test_autocast_runs_the_matmuls_in_bf16_and_the_softmax_in_float32():
    hidden, weight, targets, row_weight = _problem(dtype=torch.float32)
    exact = _dense(hidden, weight, targets, row_weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dd.kernels.linear_cross_entropy(hidden, weight, targets, row_weight)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, exact, rtol=3e-2, atol=0)  # bf16 logits: ~3 digits
    grad_w = _grads(loss, weight)[0]
    assert grad_w.dtype == torch.float32
    torch.testing.assert_close(grad_w, _grads(exact, weight)[0], rtol=0.1, atol=0.05)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(hidden=torch.zeros(3, 4, 2)), "hidden must be a 2-D float tensor"),
        (dict(weight=torch.zeros(5, 3)), "must share D"),
        (dict(targets=torch.zeros(3)), "targets must be an integer tensor"),
        (dict(targets=torch.tensor([0, 5, 1])), r"targets must lie in \[0, 5\)"),
        (dict(row_weight=torch.ones(2)), "row_weight must be a float tensor of shape"),
    ],
)
def test_bad_inputs_are_rejected(change, message):
    args = dict(
        hidden=torch.zeros(3, 4),
        weight=torch.zeros(5, 4),
        targets=torch.tensor([0, 4, 1]),
        row_weight=torch.ones(3),
    )
    args.update(change)
    with dd.debug_checks(), pytest.raises(ValueError, match=message):  # values: opt-in checks
        dd.kernels.linear_cross_entropy(**args)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        dd.kernels.linear_cross_entropy(
            torch.zeros(3, 4), torch.zeros(5, 4), torch.tensor([0, 4, 1]), chunk_size=2.0
        )


# ------------------------------------------------------------------ masked loss from hidden


def _masked_problem(dtype=torch.float64, seed=0, batch=3, length=7, dim=6, vocab=23):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=g, dtype=dtype).requires_grad_()
    head = torch.randn(vocab, dim, generator=g, dtype=dtype).requires_grad_()
    x0 = torch.randint(0, vocab, (batch, length), generator=g)
    maskable = torch.rand(batch, length, generator=g) < 0.8
    maskable[-1] = False  # a row without data ("sequence" leaves it out)
    mask = (torch.rand(batch, length, generator=g) < 0.6) & maskable
    t = torch.rand(batch, generator=g, dtype=dtype) * 0.9 + 0.1
    return hidden, head, x0, mask, maskable, t


@pytest.mark.parametrize("normalize", ["token", "masked", "sequence", "sum"])
@pytest.mark.parametrize("custom_weight", [False, True])
def test_loss_from_hidden_equals_the_loss_of_the_logits(normalize, custom_weight):
    hidden, head, x0, mask, maskable, t = _masked_problem()
    weight = None
    if custom_weight:
        weight = torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64, requires_grad=True)
    kwargs = dict(schedule=dd.CosineSchedule(), maskable=maskable, normalize=normalize)
    ours = dd.masked_diffusion_loss_from_hidden(
        hidden, head, x0, mask, t, weight=weight, backend="reference", chunk_size=2, **kwargs
    )
    theirs = dd.masked_diffusion_loss(hidden @ head.T, x0, mask, t, weight=weight, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    inputs = (hidden, head) if weight is None else (hidden, head, weight)
    for a, b in zip(_grads(ours, *inputs), _grads(theirs, *inputs)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_row_map_gives_the_loss_of_the_mapped_hidden_states():
    """A position-wise map applied to the masked rows only equals the map applied everywhere
    first: value and gradients (hidden, head, and the map's own parameters), float64."""
    hidden, head, x0, mask, maskable, t = _masked_problem()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 6, generator=g, dtype=torch.float64).requires_grad_()

    def row_map(rows):  # (..., D) -> (..., D), each row alone
        return rows + torch.tanh(rows @ w)

    kwargs = dict(schedule=dd.LinearSchedule(), maskable=maskable, backend="reference")
    ours = dd.masked_diffusion_loss_from_hidden(
        hidden, head, x0, mask, t, row_map=row_map, **kwargs
    )
    theirs = dd.masked_diffusion_loss_from_hidden(row_map(hidden), head, x0, mask, t, **kwargs)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    for a, b in zip(_grads(ours, hidden, head, w), _grads(theirs, hidden, head, w)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)
    seen = []
    dd.masked_diffusion_loss_from_hidden(
        hidden, head, x0, mask, t, row_map=lambda rows: seen.append(rows.shape) or rows, **kwargs
    )
    assert seen == [(int(mask.sum()), 6)]  # the masked rows, and only they


def test_loss_from_hidden_validates_like_the_logits_loss():
    hidden, head, x0, mask, maskable, t = _masked_problem()
    s = dd.LinearSchedule()
    with dd.debug_checks():  # the value checks are opt-in
        _validates_like_the_logits_loss(hidden, head, x0, mask, maskable, t, s)


def _validates_like_the_logits_loss(hidden, head, x0, mask, maskable, t, s):
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \(V, 6\)"):
        dd.masked_diffusion_loss_from_hidden(hidden, head[:, :3], x0, mask, t, schedule=s)
    with pytest.raises(ValueError, match="mask has positions outside maskable"):
        dd.masked_diffusion_loss_from_hidden(
            hidden, head, x0, mask | ~maskable, t, schedule=s, maskable=maskable
        )
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        dd.masked_diffusion_loss_from_hidden(hidden, head, x0, mask, t * 0, schedule=s)
    with pytest.raises(ValueError, match="backend must be one of"):
        dd.masked_diffusion_loss_from_hidden(hidden, head, x0, mask, t, schedule=s, backend="x")


# ------------------------------------------------------------------ Triton kernel (interpreter)


@needs_triton
@pytest.mark.parametrize("block_v", [16, None])
def test_triton_rows_match_the_reference_rows(block_v):
    from diffusion.kernels.triton_ce import triton_rows

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 70, generator=g) * 3  # 5 blocks of 16 columns, the last ragged
    targets = torch.tensor([0, 69, 15, 16, 33, 2])
    w = torch.rand(6, generator=g)
    ours, theirs = logits.clone(), logits.clone()
    ce = triton_rows(ours, targets, w, True, block_v=block_v)
    ce_ref = linear_ce.reference_rows(theirs, targets, w, True)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    kept = logits.clone()
    torch.testing.assert_close(triton_rows(kept, targets, w, False, block_v=block_v), ce_ref)
    assert torch.equal(kept, logits)


@needs_triton
def test_triton_backend_matches_the_reference_end_to_end():
    hidden, head, x0, mask, maskable, t = _masked_problem(dtype=torch.float32, vocab=40)
    kwargs = dict(schedule=dd.LinearSchedule(), maskable=maskable, chunk_size=3)
    ours = dd.masked_diffusion_loss_from_hidden(
        hidden, head, x0, mask, t, backend="triton", **kwargs
    )
    ref = dd.masked_diffusion_loss_from_hidden(
        hidden, head, x0, mask, t, backend="reference", **kwargs
    )
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(ours, hidden, head), _grads(ref, hidden, head)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ CUDA (bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32_000, 126_464])
def test_cuda_kernel_in_bf16_matches_the_float32_reference(vocab):
    torch.manual_seed(0)
    rows, dim = 1024, 512
    hidden = (torch.randn(rows, dim, device="cuda") / dim**0.5).bfloat16().requires_grad_()
    weight = torch.randn(vocab, dim, device="cuda").bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    row_weight = torch.rand(rows, device="cuda") + 0.5
    ours = dd.kernels.linear_cross_entropy(hidden, weight, targets, row_weight, backend="triton")
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = _dense(h32, w32, targets, row_weight)
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0)
    for a, b in zip(_grads(ours, hidden, weight), _grads(ref, h32, w32)):
        # Relative RMS error, the usual check for bf16 kernels (element-wise is too strict).
        rel = (a.float() - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()
        assert rel < 2e-2, rel


@pytest.mark.gpu
def test_cuda_auto_dispatch_uses_the_kernel_and_saves_memory():
    rows, dim, vocab = 4096, 512, 126_464
    hidden = torch.randn(rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), device="cuda")

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda: dd.kernels.linear_cross_entropy(hidden, weight, targets))
    dense = peak(lambda: F.cross_entropy((hidden @ weight.T).float(), targets, reduction="sum"))
    assert fused * 4 <= dense, (fused, dense)


# --------------------------------------------------------------------------- accumulate fallback


def _bf16_grads():
    hidden, weight, targets, row_weight = _problem(rows=9, dim=8, vocab=21, dtype=torch.float32)
    hidden = hidden.detach().bfloat16().requires_grad_()
    weight = weight.detach().bfloat16().requires_grad_()
    loss = dd.kernels.linear_cross_entropy(
        hidden, weight, targets, row_weight.detach(), backend="reference", chunk_size=4
    )
    return (loss, *_grads(loss, hidden, weight))


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The fused addmm(out_dtype=) accumulation tried on CPU too, with no fallback recorded."""
    monkeypatch.setattr(linear_ce, "FUSED_ACCUMULATE_DEVICES", {"cuda", "cpu"})
    monkeypatch.setattr(linear_ce, "_fused_unsupported", set())


def test_an_unsupported_out_dtype_addmm_warns_once_and_gives_the_reference_result(
    fused_on_cpu, monkeypatch
):
    # This CPU torch has no `aten::addmm.dtype_out` kernel: the known, unsupported case.
    with pytest.warns(RuntimeWarning, match="cannot accumulate") as caught:
        first = _bf16_grads()
        second = _bf16_grads()
    assert len([w for w in caught if "cannot accumulate" in str(w.message)]) == 1
    assert linear_ce._fused_unsupported == {"cpu"}
    monkeypatch.setattr(linear_ce, "FUSED_ACCUMULATE_DEVICES", {"cuda"})
    reference = _bf16_grads()
    for got in (first, second):
        for a, b in zip(got, reference, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        TypeError("unsupported operand type(s)"),
    ],
    ids=["runtime", "oom", "type"],
)
def test_any_other_error_of_the_fused_accumulation_propagates(fused_on_cpu, monkeypatch, error):
    def fail(acc, a, b):
        raise error

    monkeypatch.setattr(linear_ce, "_addmm_into", fail)
    with pytest.raises(type(error), match=str(error).split(".")[0][:20]):
        _bf16_grads()
    assert linear_ce._fused_unsupported == set()  # nothing switched off behind the caller's back
