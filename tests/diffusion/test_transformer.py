"""The reference Transformer: layout contract, split forward, padding invariance, rotary
properties, second-order gradients with the math backend, and no graph breaks under compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffusion as dd
from diffusion import transformer as tr

VOCAB = 11


def _model(dtype=torch.float64, **kwargs):
    torch.manual_seed(0)
    config = dict(d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=32)
    config.update(kwargs)
    return dd.Transformer(VOCAB, **config).to(dtype)


def test_layout_contract():
    model = dd.Transformer(VOCAB, max_seq_len=64)
    assert model.vocab_size == VOCAB and model.max_seq_len == 64
    assert isinstance(model.layers, nn.ModuleList) and len(model.layers) == 4
    for layer in model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(layer.mlp, name)
            assert isinstance(linear, nn.Linear) and linear.bias is None
    assert (
        model.layers[0].mlp.gate_proj.in_features,
        model.layers[0].mlp.gate_proj.out_features,
    ) == (128, 256)
    assert isinstance(model.norm, tr.RMSNorm)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.out_features == VOCAB
    assert "rope_cos" not in model.state_dict()  # cached tables are not checkpointed
    logits = model(torch.randint(0, VOCAB, (2, 7)))
    assert logits.shape == (2, 7, VOCAB) and logits.dtype == torch.float32


def test_tied_embeddings_share_one_matrix():
    model = _model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    untied = _model()
    assert (
        sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters())
        == VOCAB * 32
    )


def test_rmsnorm_closed_form():
    norm = tr.RMSNorm(5, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 6.0))
    x = torch.randn(3, 5, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_split_forward_equals_forward_for_every_layer(with_mask):
    model = _model()
    x = torch.randint(0, VOCAB, (3, 9))
    mask = None
    if with_mask:
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[0, :3] = False
    full = model(x, mask)
    for k in range(len(model.layers) + 1):
        h = model.hidden_states(x, mask, upto=k)
        assert h.shape == (3, 9, 32)
        torch.testing.assert_close(model.logits_from(h, mask, start=k), full, rtol=0, atol=0)
    for k in range(len(model.layers)):  # split between layer k's attention and feed-forward
        h = model.hidden_states(x, mask, upto=k, mid_layer=True)
        after_attention = model.layers[k].attend(
            model.hidden_states(x, mask, upto=k), *model._positions(mask, 9)
        )
        torch.testing.assert_close(h, after_attention, rtol=0, atol=0)
        out = model.logits_from(h, mask, start=k, mid_layer=True)
        torch.testing.assert_close(out, full, rtol=0, atol=0)


def test_mid_layer_split_needs_a_layer():
    model = _model()
    n = len(model.layers)
    with pytest.raises(ValueError, match="mid_layer=True needs upto < n_layers"):
        model.hidden_states(torch.zeros(1, 3, dtype=torch.long), upto=n, mid_layer=True)
    with pytest.raises(ValueError, match="mid_layer=True needs start < n_layers"):
        model.features_from(torch.zeros(1, 3, 32), start=n, mid_layer=True)


def test_left_and_right_padding_leave_real_token_logits_unchanged():
    model = _model()
    row = torch.randint(0, VOCAB, (1, 6))
    alone = model(row)
    pad = torch.full((1, 3), 4)
    left = model(torch.cat([pad, row], 1), torch.tensor([[False] * 3 + [True] * 6]))
    right = model(torch.cat([row, pad], 1), torch.tensor([[True] * 6 + [False] * 3]))
    torch.testing.assert_close(left[:, 3:], alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(right[:, :6], alone, rtol=1e-12, atol=1e-12)
    # Control: without the mask the padding is attended to and positions shift.
    assert not torch.allclose(model(torch.cat([pad, row], 1))[:, 3:], alone, atol=1e-6)


def test_padding_invariance_inside_a_batch():
    model = _model()
    rows = [torch.randint(0, VOCAB, (n,)) for n in (3, 7, 5)]
    batch = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for i, r in enumerate(rows):
        batch[i, 7 - len(r) :] = r
        mask[i, 7 - len(r) :] = True
    logits = model(batch, mask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(
            logits[i, 7 - len(r) :], model(r[None])[0], rtol=1e-12, atol=1e-12
        )


def test_attention_is_bidirectional():
    model = _model()
    x = torch.randint(0, VOCAB, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % VOCAB
    assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])


def test_rotary_scores_depend_on_relative_position_only():
    cos, sin = tr.rotary_tables(64, 8)
    cos, sin = cos.double(), sin.double()
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m, n):
        return float(tr.apply_rotary(q, cos[m], sin[m]) @ tr.apply_rotary(k, cos[n], sin[n]))

    for shift in (1, 7, 30):
        assert score(3 + shift, 10 + shift) == pytest.approx(score(3, 10), abs=1e-5)
    assert score(3, 10) != pytest.approx(score(3, 11), abs=1e-3)
    # A rotation keeps norms.
    torch.testing.assert_close(tr.apply_rotary(q, cos[5], sin[5]).norm(), q.norm())


def test_rotary_tables_are_built_once(monkeypatch):
    model = _model()
    tables = (model.rope_cos, model.rope_sin)

    def fail(*args, **kwargs):
        raise AssertionError("rotary tables rebuilt in forward")

    monkeypatch.setattr(tr, "rotary_tables", fail)
    model(torch.randint(0, VOCAB, (2, 5)), torch.ones(2, 5, dtype=torch.bool))
    model(torch.randint(0, VOCAB, (2, 5)))
    assert model.rope_cos is tables[0] and model.rope_sin is tables[1]


def test_math_backend_gives_the_same_forward():
    model = _model(torch.float32)
    x = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    default = model(x, mask)
    model.attn_backend = "math"
    torch.testing.assert_close(model(x, mask), default, rtol=1e-5, atol=1e-5)


def test_second_order_gradient_through_attention_matches_finite_differences():
    """With attn_backend="math" a Hessian-vector product via double backward works on CPU and
    matches central differences of the gradient (float64)."""
    model = _model(attn_backend="math")
    x = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    weight = model.layers[0].attn.q_proj.weight
    direction = torch.randn_like(weight)

    def gradient(create_graph):
        logits = model(x, mask)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x.reshape(-1))
        return torch.autograd.grad(loss, weight, create_graph=create_graph)[0]

    g = gradient(create_graph=True)
    (hvp,) = torch.autograd.grad((g * direction).sum(), weight)
    eps = 1e-5
    with torch.no_grad():
        weight.add_(eps * direction)
    plus = gradient(create_graph=False)
    with torch.no_grad():
        weight.sub_(2 * eps * direction)
    minus = gradient(create_graph=False)
    torch.testing.assert_close(hvp, (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-8)
    assert float(hvp.abs().max()) > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_has_no_graph_breaks_under_dynamo(with_mask):
    model = dd.Transformer(VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)
    x = torch.randint(0, VOCAB, (2, 8))
    args = (x, torch.ones(2, 8, dtype=torch.bool)) if with_mask else (x,)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(d_model=30, n_heads=4), ValueError, "even integer"),
        (dict(d_model=12, n_heads=4), ValueError, "even integer"),  # head_dim 3 is odd
        (dict(n_layers=0), ValueError, "n_layers must be >= 1"),
        (dict(d_ff=2.5), TypeError, "d_ff must be an int"),
        (dict(attn_backend="flash"), ValueError, "attn_backend must be one of"),
    ],
)
def test_constructor_rejects_bad_sizes(kwargs, error, match):
    with pytest.raises(error, match=match):
        dd.Transformer(VOCAB, **kwargs)


def test_forward_rejects_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="attention_mask must be a bool"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention_mask must be a bool"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"upto must be an int in \[0, 3\]"):
        model.hidden_states(torch.zeros(1, 3, dtype=torch.long), upto=4)
    with pytest.raises(ValueError, match=r"start must be an int in \[0, 3\]"):
        model.logits_from(torch.zeros(1, 3, 32, dtype=torch.float64), start=-1)
    with pytest.raises(ValueError, match="h must be"):
        model.logits_from(torch.zeros(3, 32), start=0)
