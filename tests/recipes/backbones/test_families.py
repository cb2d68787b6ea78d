"""The LLaDA family through `recipes.memdlm.backbones.hf`, on tiny remote-code stand-ins.

Each stand-in reproduces its family's quirk (checked on the raw model), and the adapter
undoes it (checked against an oracle: a loop over samples, the model's own explicit mask, the
unshifted logits). Then the recipe's four commands run end to end on each family.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import diffusion as dd  # noqa: E402
import memory as mm  # noqa: E402
from recipes.memdlm.backbones import hf  # noqa: E402
from recipes.memdlm.cli import main  # noqa: E402
from recipes.memdlm.config import build_config  # noqa: E402
from tests.recipes.backbones import standins  # noqa: E402

NAMES = tuple(standins.FAMILIES)
MOE = ("llada_moe", "llada2", "llada21")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: standins.write(name, root / name) for name in NAMES}


def raw(folders, name):
    """The stand-in as transformers loads it, with no adapter."""
    auto = getattr(transformers, standins.FAMILIES[name].auto_map[-1])
    return auto.from_pretrained(folders[name], trust_remote_code=True)


def config(folder: Path, **memdlm):
    tree = {
        "model": {"path": str(folder), "trust_remote_code": True},
        "memdlm": {"layer_fraction": 0.5, **memdlm},
    }
    return build_config("smoke", overrides=tree)


def load(folders, name, **options) -> hf.HFDenoiser:
    model = hf.load_model(config(folders[name]), device="cpu")
    if options:
        model = hf.HFDenoiser(model.hf, **options)
    return model


def tokens(shape=(2, 11), seed=0, vocab=300) -> torch.Tensor:
    return torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(seed))


def random_state(mem, batch, seed=3, dtype=torch.float64):
    """A per-sample state with non-zero B (so every fast weight changes the output)."""
    g = torch.Generator().manual_seed(seed)
    state = mem.init(batch_size=batch, generator=g, dtype=dtype)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in state.items()}


# --------------------------------------------------------------------------- the stand-ins


def test_the_standins_have_their_familys_module_paths_and_special_tokens(folders):
    llada = raw(folders, "llada")
    block = llada.model.transformer.blocks[1]
    assert all(isinstance(getattr(block, n), torch.nn.Linear) for n in ("ff_proj", "up_proj"))
    assert isinstance(block(torch.zeros(1, 3, 32)), tuple)  # (x, cache)
    moe = raw(folders, "llada_moe")
    assert isinstance(moe.model.layers[1].mlp.experts[7].down_proj, torch.nn.Linear)
    assert isinstance(moe.model.layers[1].shared_expert, torch.nn.Module)  # on the layer
    llada2 = raw(folders, "llada2")
    mlp = llada2.model.layers[1].mlp
    assert isinstance(mlp.gate.weight, torch.nn.Parameter)
    assert not isinstance(mlp.gate, torch.nn.Linear)
    assert isinstance(mlp.shared_experts.up_proj, torch.nn.Linear)
    assert isinstance(raw(folders, "dream").model.layers[0].self_attn.rotary_emb, torch.nn.Module)
    for name, mask in [("llada", "<|mdm_mask|>"), ("llada_moe", "<|mask|>"), ("dream", "<|mask|>")]:
        tok = hf.load_tokenizer(folders[name], trust_remote_code=True)
        vocab = tok.tokenizer.get_vocab()
        assert (tok.mask_id, tok.eos_id, tok.pad_id) == (
            vocab[mask],
            vocab["<|endoftext|>"],
            vocab["<|endoftext|>"],
        )


def expert_input_shapes(model, layer) -> list[tuple[int, ...]]:
    """Run the model once and collect the shape of every routed expert call in `layer`."""
    shapes = []
    handles = [
        e.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
        for e in layer.mlp.experts
    ]
    try:
        model(input_ids=tokens((1, 3)))
    finally:
        for h in handles:
            h.remove()
    return shapes


@pytest.mark.parametrize("name", MOE)
def test_routed_experts_get_flat_rows_and_empty_calls_in_the_standin(folders, name):
    model = raw(folders, name).train()
    shapes = expert_input_shapes(model, model.model.layers[2])
    assert len(shapes) == 8 and all(len(s) == 2 for s in shapes)  # every expert, (n, hidden)
    assert (0, 32) in shapes  # 3 tokens x top-2 cannot reach all 8 experts


def test_llada2_in_eval_mode_gives_its_experts_no_gradient_but_the_adapter_does(folders):
    def expert_grads(model, forward):
        model.eval()
        forward(tokens((1, 6))).float().sum().backward()
        experts = model.model.layers[3].mlp.experts if hasattr(model, "model") else None
        return sum(p.grad is not None for p in experts.parameters())

    original = raw(folders, "llada2")
    assert expert_grads(original, lambda x: original(input_ids=x).logits) == 0
    adapted = load(folders, "llada2")
    assert expert_grads(adapted.hf, adapted) > 0


# --------------------------------------------------------------------------- the adapter


@pytest.mark.parametrize("name", NAMES)
def test_split_forward_equals_the_full_forward_at_every_layer(folders, name):
    model = load(folders, name).double().eval()
    assert model.split, model.split_note
    x = tokens()
    with torch.no_grad():
        full = model(x)
        for k in range(len(model.layers)):
            resumed = model.logits_from(model.hidden_states(x, upto=k), start=k)
            torch.testing.assert_close(resumed, full, rtol=1e-10, atol=1e-10)


def test_dream_logits_are_shifted_so_that_position_i_predicts_token_i(folders):
    original, model = raw(folders, "dream").eval(), load(folders, "dream").eval()
    x = tokens()
    with torch.no_grad():
        unshifted = original(input_ids=x).logits
        logits = model(x)
        hidden = model.hidden_states(x, upto=1)
        resumed = model.logits_from(hidden, start=1)
    torch.testing.assert_close(logits[:, 1:], unshifted[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(logits[:, 0], unshifted[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(resumed, logits, rtol=1e-6, atol=1e-6)


def padded(x):
    mask = torch.ones_like(x)
    mask[0, -3:] = 0  # row 0 has three pad tokens at the end
    return mask


def test_llada2_turns_a_padding_mask_causal_but_the_adapter_stays_bidirectional(folders):
    original, model = raw(folders, "llada2").eval(), load(folders, "llada2").eval()
    x = tokens()
    mask = padded(x)
    y = x.clone()
    y[:, 5] = torch.where(x[:, 5] == 5, 6, 5)  # a real token after position 0
    with torch.no_grad():
        causal = original(input_ids=y, attention_mask=mask).logits
        causal = (causal - original(input_ids=x, attention_mask=mask).logits)[:, 0]
        assert causal.abs().max() < 1e-6  # the quirk: position 0 no longer sees position 5
        change = (model(y, mask) - model(x, mask))[:, 0].abs().max()
        # The oracle: the model's own path for an explicit 4-D key-padding mask.
        keys = torch.zeros(2, 1, 11, 11).masked_fill(~mask.bool()[:, None, None, :], -1e30)
        expected = original(input_ids=x, attention_mask=keys).logits
        torch.testing.assert_close(model(x, mask), expected, rtol=1e-5, atol=1e-5)
    assert change > 1e-4


@pytest.mark.parametrize("name", ["llada2", "dream"])
def test_block_causal_attention_sees_its_block_and_the_blocks_before(folders, name):
    model = load(folders, name, attention="block_causal", block_size=4).eval()
    x = tokens((1, 12))

    def moved(position):
        y = x.clone()
        y[0, position] = 5 if x[0, position] != 5 else 6
        with torch.no_grad():
            return (model(y) - model(x))[0].abs().amax(-1)  # (L,) change per position

    late = moved(9)  # block 2
    assert late[: 8 - int(model.shift)].max() < 1e-6 and late[9 + int(model.shift)] > 1e-5
    early = moved(1)  # block 0: seen by every later block and by position 0 of its own
    assert early[int(model.shift)] > 1e-5 and early[10] > 1e-5
    with pytest.raises(ValueError, match="block_causal"):
        load(folders, "llada_moe", attention="block_causal")
    # The same mode switched on for sampling only, on a bidirectional model.
    bidirectional = load(folders, name).eval()
    with torch.no_grad():
        with bidirectional.attention_mode("block_causal", block_size=4):
            torch.testing.assert_close(bidirectional(x), model(x), rtol=0, atol=0)
        assert bidirectional.attention == "bidirectional"
        assert (bidirectional(x) - model(x)).abs().max() > 1e-5


@pytest.mark.parametrize("name", MOE)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_per_sample_fast_weights_on_routed_experts_equal_a_loop_over_samples(
    folders, name, train, batch
):
    model = load(folders, name).double().train(train)
    targets = model.fast_weight_targets(0.5)
    assert any(".mlp.experts." in t for t in targets)
    mem = mm.FastLoRA(model, targets, rank=2, alpha=4.0)
    state = random_state(mem, batch)
    x = tokens((batch, 9), seed=1)
    with torch.no_grad(), mem.bind(state):
        together = model(x)
    with torch.no_grad():
        off = model(x)
    assert (together - off).abs().max() > 1e-3  # the fast weights do something
    for b in range(batch):
        alone = {k: v[b : b + 1] for k, v in state.items()}
        with torch.no_grad(), mem.bind(alone):
            torch.testing.assert_close(
                together[b : b + 1], model(x[b : b + 1]), rtol=1e-6, atol=1e-6
            )


def test_one_adapted_state_broadcast_over_rows_equals_each_row_alone(folders):
    """The ELBO estimator runs B x mc rows of one adapted prompt through one state."""
    model = load(folders, "llada_moe").double().eval()
    mem = mm.FastLoRA(model, model.fast_weight_targets(0.5), rank=2, alpha=4.0)
    state = random_state(mem, 1)
    prompt, response = tokens((1, 6), seed=2), tokens((1, 4), seed=3)

    def elbo(rows_state):
        with mem.bind(rows_state):
            g = torch.Generator().manual_seed(0)
            return dd.elbo_log_likelihood(
                model, prompt, response, mask_id=2, mc_num=8, batch_size=4, generator=g
            )

    rows = hf.broadcast_state(mem, state, 4)
    x = tokens((4, 10), seed=4)
    with torch.no_grad(), mem.bind(rows):
        together = model(x)
    with torch.no_grad(), mem.bind(state):
        for r in range(4):
            torch.testing.assert_close(
                together[r : r + 1], model(x[r : r + 1]), rtol=1e-6, atol=1e-6
            )
    assert torch.isfinite(elbo(rows)).all()
    with pytest.raises(ValueError, match="per-sample state of one sample"):
        hf.broadcast_state(mem, rows, 2)


def test_the_description_names_family_forward_and_fast_weights(folders):
    info = load(folders, "llada2").describe(0.5)
    assert (
        info["family"] == "llada2"
        and info["split"]
        and info["routing"] == {2: "module", 3: "module"}
    )
    assert info["fast_weights"] == 2 * (8 + 1) * 3 and info["fast_weight_layers"] == [2, 3]
    line = load(folders, "llada").description(0.5)
    assert line.startswith("backbone llada (LLaDAModelLM): split at layer 2")
    assert "2 ff_proj, 2 up_proj, 2 ff_out" in line


# --------------------------------------------------------------------------- LLaDA2.1, Dream


def test_llada21_keeps_the_routing_index_batched_and_the_adapter_returns_it_so(folders):
    raw21, raw20 = raw(folders, "llada21"), raw(folders, "llada2")
    assert raw21.config.model_type == "llada21_moe"  # config.json says llada2_moe
    h = torch.randn(2, 5, 32)
    y21, (logits21, index21) = raw21.model.layers[2].mlp.eval()(h)
    _, (_, index20) = raw20.model.layers[2].mlp.eval()(h)
    assert logits21.shape == (2, 5, 8) and index21.shape == (2, 5, 2) and index20.shape == (10, 2)
    model = load(folders, "llada21")
    assert model.describe(0.5)["routing"] == {2: "module", 3: "module"}
    block = model.hf.model.layers[2].mlp.eval()
    y, (logits, index) = block(h)  # the adapter's dispatch, same weights as raw21
    assert index.shape == index21.shape and logits.shape == logits21.shape
    torch.testing.assert_close(y, y21, rtol=1e-5, atol=1e-6)
    assert torch.equal(index.sort(-1).values, index21.sort(-1).values)


@pytest.fixture
def looped(folders, monkeypatch):
    """LLaDA2.1 with its MoE blocks served by the per-sample loop (as for routing code the
    adapter's dispatch cannot reproduce)."""
    monkeypatch.setattr(hf.routing, "find_routing", lambda block: None)
    return load(folders, "llada21").double()


def test_the_per_sample_loop_is_named_in_the_description(looped):
    info = looped.describe(0.5)
    assert info["routing"] == {2: "per_sample", 3: "per_sample"}
    assert "MoE blocks run once per sample (exact, slower) in layers [2, 3]" in looped.description(
        0.5
    )


@pytest.mark.parametrize("train", [False, True])
def test_the_per_sample_loop_equals_the_adapter_dispatch_values_and_gradients(
    folders, looped, train
):
    """Two exact paths, the same numbers: outputs, and gradients to the fast weights in eval
    mode too (LLaDA2's eval-mode dispatch runs under no_grad; the loop switches to train mode)."""
    fast = load(folders, "llada21").double()
    results = []
    for model in (looped.train(train), fast.train(train)):
        mem = mm.FastLoRA(model, model.fast_weight_targets(0.5), rank=2, alpha=4.0)
        state = {k: v.requires_grad_() for k, v in random_state(mem, 3).items()}
        with mem.bind(state):
            out = model(tokens((3, 9), seed=1))
        out.square().mean().backward()
        expert = next(k for k in state if ".mlp.experts." in k and k.endswith(".B"))
        results.append((out.detach(), {k: v.grad for k, v in state.items()}, expert))
        mem.remove()
    (out_a, grad_a, expert), (out_b, grad_b, _) = results
    torch.testing.assert_close(out_a, out_b, rtol=1e-9, atol=1e-9)
    assert grad_a[expert].abs().sum() > 0
    for key in grad_a:
        torch.testing.assert_close(grad_a[key], grad_b[key], rtol=1e-7, atol=1e-9)


def test_the_per_sample_loop_returns_the_blocks_own_auxiliary_shapes(folders, looped):
    block = looped.hf.model.layers[2].mlp.eval()
    mem = mm.FastLoRA(looped, looped.fast_weight_targets(0.5), rank=2, alpha=4.0)
    h = torch.randn(3, 5, 32, dtype=torch.float64)
    with torch.no_grad(), mem.bind(random_state(mem, 3)):
        y, (logits, index) = block(h)
    assert y.shape == (3, 5, 32) and logits.shape == (3, 5, 8) and index.shape == (3, 5, 2)


def test_the_dream_standin_has_a_head_larger_than_its_tokenizer(folders):
    model = raw(folders, "dream")
    tok = hf.load_tokenizer(folders["dream"], trust_remote_code=True)
    assert model.config.vocab_size == tok.vocab_size + 16
    with pytest.raises(TypeError):  # the original's slow tokenizer cannot decode such an id
        tok.tokenizer.decode([5, tok.vocab_size + 3])
    assert tok.decode([5, tok.vocab_size + 3, -1]) == tok.tokenizer.decode([5])  # ours can


SAMPLERS = [
    {"remasking": "low_confidence"},
    {"remasking": "random", "temperature": 1.0},
    {"remasking": "margin", "temperature": 2.0},
    {"remasking": "entropy", "temperature": 0.5},
    {"threshold": 0.3},
    {"cache": "prefix", "block_length": 4},
    {"cache": "dual", "block_length": 4, "threshold": 0.3},
    {"cfg_scale": 0.5, "remasking": "random", "temperature": 1.0},
]


@pytest.mark.parametrize("name", NAMES)
def test_every_sampler_path_emits_only_decodable_ids(folders, name):
    """The recipe's model (logits cut to the tokenizer) never proposes an id the tokenizer
    lacks, nor the mask, on any sampler path (remasking rules, temperature, threshold, the KV
    caches, guidance); decoding its output never raises."""
    from recipes.memdlm.build import new_model
    from recipes.memdlm.data.prepare import tokenizer_for

    cfg = config(folders[name])
    tok = tokenizer_for(cfg)
    model = new_model(cfg, tok, seed=0, device="cpu").eval()
    # the head's extra rows get the highest logits: without the cut they would always win
    head = model.hf.get_output_embeddings()
    if head.weight.shape[0] > tok.vocab_size:
        with torch.no_grad():
            head.weight[tok.vocab_size :] = 50 * head.weight[: tok.vocab_size].abs().max()
    prompt = tokens((2, 5), vocab=tok.vocab_size - 5)
    for options in SAMPLERS:
        g = torch.Generator().manual_seed(0)
        out = dd.generate(
            model, prompt, mask_id=tok.mask_id, gen_length=8, steps=8, generator=g, **options
        )
        assert int(out.max()) < tok.vocab_size and not bool((out == tok.mask_id).any()), options
        for row in out.tolist():
            assert isinstance(tok.decode(row), str)


# --------------------------------------------------------------------------- the recipe


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_train_eval_sample_and_compare_run_on_each_family(folders, name, tmp_path, capsys):
    common = ["--preset", "smoke", "--quiet", "--data.eval_per_cell", "2"]
    common += ["--eval.exposure_examples", "4", "--memdlm.layer_fraction", "0.5"]
    common += ["--model", str(folders[name]), "--model.trust_remote_code", "true"]
    out = tmp_path / "run"
    train = ["train", *common, "--method", "memdlm", "--memdlm.per_sample", "true"]
    assert main([*train, "--train.steps", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["memdlm"]
    for key in ("eval_loss", "eval_loss_answer_adapted", "eval_loss_adapted"):
        assert 0 < summary[key] < 20, key
    capsys.readouterr()
    assert main(["eval", str(out), "--method", "memdlm", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(summary["eval_loss"])
    prompt = "lynx code is 7K. the class. lynx code? "
    assert main(["sample", str(out), "--prompt", prompt, "--adapt", "--gen-length", "4"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # the decoded answer, one line
    compare = ["compare", *common, "--train.steps", "2", "--out", str(tmp_path / "cmp")]
    assert main([*compare, "--no-cache"]) == 0
    result = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert result["memdlm"]["eval_loss_adapted"] > 0 and result["standard"]["train_loss_final"] > 0


def test_api_generate_samples_with_the_configured_attention(folders):
    """`model.sample_attention` reaches the one sampling path (`api.generate`, which `sample`
    and the lm-eval model call): the same tokens as sampling inside the attention mode."""
    from recipes.memdlm import api

    model = load(folders, "llada2").eval()
    prompt = tokens((2, 5), seed=4)
    options = dict(mask_id=2, gen_length=8, steps=8, block_length=4)
    with model.attention_mode("block_causal", block_size=4):
        expected = dd.generate(model, prompt, generator=torch.Generator().manual_seed(0), **options)
    out = api.generate(
        model, prompt, adapt=False, sample_attention="block_causal", sample_block_size=4,
        generator=torch.Generator().manual_seed(0), **options,
    )  # fmt: skip
    assert torch.equal(out, expected) and model.attention == "bidirectional"
