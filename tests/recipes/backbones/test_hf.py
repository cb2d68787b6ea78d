"""Hugging Face backbones (recipes/memdlm/hf.py), offline: tiny models built from `transformers`
configs and tokenizers trained here, saved to a folder and loaded through `model.path`.

- a Qwen2-MoE decoder (fused experts, a shared expert, a dense last layer), standing in for
  LLaDA-MoE's layout `model.layers[i].mlp.experts[j].{gate,up,down}_proj`, with a byte-level BPE
  tokenizer whose mask token `<|mask|>` is found by name;
- BERT and ModernBERT masked LMs with WordPiece tokenizers ([MASK], [SEP] as end of answer).
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

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

import diffusion as dd  # noqa: E402
import memory as mm  # noqa: E402
from recipes.memdlm import method  # noqa: E402
from recipes.memdlm.backbones import hf  # noqa: E402
from recipes.memdlm.cli import main  # noqa: E402
from recipes.memdlm.config import build_config  # noqa: E402
from recipes.memdlm.data.batches import Batch  # noqa: E402
from recipes.memdlm.data.prepare import tokenizer_for  # noqa: E402
from recipes.memdlm.data.tasks import filler_text  # noqa: E402
from tests.recipes.method.test_step import memdlm_step  # noqa: E402

KINDS = ("moe", "bert", "modernbert")


def corpus() -> list[str]:
    text = filler_text("train")[:20000]
    extra = ["0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ code is VAR = ? ."] * 5
    return [text[i : i + 500] for i in range(0, len(text), 500)] + extra


def bpe_tokenizer(folder: Path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|mask|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(folder)
    return fast


def wordpiece_tokenizer(folder: Path):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(
        corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    fast = transformers.BertTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(folder)
    return fast


def build(kind: str, folder: Path) -> Path:
    torch.manual_seed(0)
    if kind == "moe":
        vocab = len(bpe_tokenizer(folder))
        config = transformers.Qwen2MoeConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[3],  # a dense last layer next to a MoE layer
            max_position_embeddings=512,
        )
        model = transformers.Qwen2MoeForCausalLM(config)
    elif kind == "bert":
        vocab = len(wordpiece_tokenizer(folder))
        config = transformers.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        model = transformers.BertForMaskedLM(config)
    else:
        vocab = len(wordpiece_tokenizer(folder))
        config = transformers.ModernBertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=2,
            cls_token_id=2,
            eos_token_id=3,
            sep_token_id=3,
            global_attn_every_n_layers=2,
            local_attention=16,
            embedding_dropout=0.0,
            mlp_dropout=0.0,
            attention_dropout=0.0,
        )
        model = transformers.ModernBertForMaskedLM(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: build(kind, root / kind) for kind in KINDS}


def recipe_config(path: Path, **overrides):
    tree = {"model": {"path": str(path)}, "memdlm": {"layer_fraction": 0.5}}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        tree.setdefault(section, {})[name] = value
    return build_config("smoke", overrides=tree)


def load(folders, kind, **overrides):
    return hf.load_model(recipe_config(folders[kind], **overrides), device="cpu")


def float64(model: hf.HFDenoiser) -> hf.HFDenoiser:
    """The model in float64 (gradient checks); fused experts then need the eager kernel."""
    if hasattr(model.hf, "set_experts_implementation"):
        model.hf.set_experts_implementation("eager")
    return model.double()


def tokens(vocab: int, shape=(2, 11), seed=0) -> torch.Tensor:
    return torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("kind", KINDS)
def test_split_forward_equals_the_full_forward_at_every_layer(folders, kind):
    model = load(folders, kind).eval()
    assert model.split, "the split forward was not verified"
    x = tokens(model.hf.get_input_embeddings().num_embeddings)
    with torch.no_grad():
        full = model(x)
        for k in range(len(model.layers)):
            resumed = model.logits_from(model.hidden_states(x, upto=k), start=k)
            torch.testing.assert_close(resumed, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_is_bidirectional(folders, kind):
    model = load(folders, kind).eval()
    x = tokens(model.hf.get_input_embeddings().num_embeddings)
    y = x.clone()
    y[:, -1] = torch.where(x[:, -1] == 5, 6, 5)  # only the last token changes
    with torch.no_grad():
        change = (model(y)[:, 0] - model(x)[:, 0]).abs().max()
    assert change > 1e-4  # the first position sees the last one


def test_the_decoder_made_bidirectional_matches_transformers_own_bidirectional_mask(folders):
    model = load(folders, "moe").eval()
    x = tokens(model.hf.config.vocab_size)
    full_attention = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1])  # additive, all visible
    with torch.no_grad():
        expected = model.hf(input_ids=x, attention_mask=full_attention).logits
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


class FusedExperts(torch.nn.Module):
    """transformers 5's fused-experts layout (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I)),
    written out here since the pinned 4.57 line has no fused experts; eager forward."""

    is_concatenated, is_transposed, has_bias = True, False, False

    def __init__(self, experts=4, hidden=32, inner=16, seed=1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = torch.nn.Parameter(
            torch.randn(experts, 2 * inner, hidden, generator=g, dtype=torch.float64)
        )
        self.down_proj = torch.nn.Parameter(
            torch.randn(experts, hidden, inner, generator=g, dtype=torch.float64)
        )
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden, index, weights):
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for slot in range(index.shape[1]):
                e = int(index[t, slot])
                gate, up = (self.gate_up_proj[e] @ hidden[t]).chunk(2)
                out[t] += weights[t, slot] * (self.down_proj[e] @ (self.act_fn(gate) * up))
        return out


def test_unfused_experts_compute_what_the_fused_experts_compute():
    fused = FusedExperts()
    unfused = hf.UnfusedExperts(fused)
    assert isinstance(unfused.get_submodule("3.down_proj"), torch.nn.Linear)
    assert len(unfused.experts()) == 4
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(10, 32, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(unfused(hidden, index, weights), fused(hidden, index, weights))


def test_the_adapter_dispatch_computes_what_the_moe_block_computes(folders):
    """Qwen2-MoE's ModuleList experts: the taken-over block equals transformers' own, and
    the whole model's logits do not change (float64)."""
    original = transformers.AutoModelForCausalLM.from_pretrained(folders["moe"]).double()
    x = tokens(original.config.vocab_size)
    hf.make_bidirectional(original)
    full = torch.zeros(x.shape[0], 1, x.shape[1], x.shape[1], dtype=torch.float64)
    with torch.no_grad():
        before = original(input_ids=x, attention_mask=full).logits
        block = original.model.layers[2].mlp
        hidden = torch.randn(3, 5, 32, dtype=torch.float64)
        own = block(hidden)
        wrapped = hf.wrap(original, layer_fraction=0.5)
        assert hf.Routing("softmax", shared="gated", output="logits") == block.memdlm_routing
        taken = block(hidden)
        after = wrapped(x)
    torch.testing.assert_close(taken[0], own[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(taken[1], own[1], rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)
    assert wrapped.describe(0.5)["routing"] == {2: "softmax"}  # layer 3 is dense


def test_per_sample_fast_weights_in_moe_experts_equal_each_sample_alone(folders):
    """The padded (B, n, H) expert inputs give sample b exactly its own LoRA."""
    model = float64(load(folders, "moe").eval())
    mem = mm.FastLoRA(model, model.fast_weight_targets(0.5), rank=2, alpha=4.0)
    g = torch.Generator().manual_seed(3)
    state = mem.init(batch_size=3, generator=g, dtype=torch.float64)
    state = {
        k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()
    }
    x = tokens(model.hf.config.vocab_size, shape=(3, 9))
    with torch.no_grad(), mem.bind(state):
        together = model(x)
    for b in range(3):
        alone = {k: v[b : b + 1] for k, v in state.items()}
        with torch.no_grad(), mem.bind(alone):
            torch.testing.assert_close(together[b : b + 1], model(x[b : b + 1]))


def test_fast_weight_targets_follow_each_layout(folders):
    moe = load(folders, "moe").fast_weight_targets(0.5)
    experts = [n for n in moe if ".layers.2." in n]
    assert len(experts) == 4 * 3 and all(".mlp.experts." in n for n in experts)  # no shared
    assert [n for n in moe if ".layers.3." in n] == [
        f"hf.model.layers.3.mlp.{p}_proj" for p in ("gate", "up", "down")
    ]
    assert load(folders, "bert").fast_weight_targets(0.5) == [
        "hf.bert.encoder.layer.1.intermediate.dense",
        "hf.bert.encoder.layer.1.output.dense",  # not attention.output.dense
    ]
    assert load(folders, "modernbert").fast_weight_targets(0.3) == [  # int(3 * 0.7) = 2
        "hf.model.layers.2.mlp.Wi",
        "hf.model.layers.2.mlp.Wo",
    ]
    named = load(folders, "moe").fast_weight_targets(0.25, ("down_proj",))
    assert named == ["hf.model.layers.3.mlp.down_proj"]
    with pytest.raises(ValueError, match="no FFN linear matches"):
        load(folders, "bert").fast_weight_targets(0.5, ("gate_proj",))


def test_activation_checkpointing_is_refused(folders):
    model = transformers.AutoModelForMaskedLM.from_pretrained(folders["bert"])
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        hf.wrap(model)


def test_tokens_come_from_the_tokenizer(folders):
    bpe = hf.load_tokenizer(folders["moe"])
    vocab = bpe.tokenizer.get_vocab()
    assert (bpe.mask_id, bpe.eos_id, bpe.pad_id) == (
        vocab["<|mask|>"],
        vocab["<|endoftext|>"],
        vocab["<|pad|>"],
    )
    text = "lynx code is 7K."
    assert bpe.decode([*bpe.encode(text), bpe.eos_id, *bpe.encode(" more")]) == text
    bert = hf.load_tokenizer(folders["bert"])
    assert (bert.mask_id, bert.eos_id) == (
        bert.tokenizer.mask_token_id,
        bert.tokenizer.sep_token_id,
    )
    assert hf.load_tokenizer(folders["moe"], mask_token="<|pad|>").mask_id == vocab["<|pad|>"]
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        hf.load_tokenizer(folders["moe"], mask_token="<nope>")


# --------------------------------------------------------------------------- the method


def memdlm_losses(model, cfg, x0, maskable, seed=0):
    """One MemDLM step's outer loss and the gradient of every trainable weight."""
    mem = method.make_fast_weights(model, cfg.memdlm)
    try:
        batch = Batch(x0, maskable, maskable.long().argmax(1))
        g = torch.Generator(device=x0.device).manual_seed(seed)
        anchor = method.sample_anchor(batch, mask_id=1, eps=1e-3, generator=g)
        out = memdlm_step(
            model, mem, batch, anchor, cfg.memdlm, mask_id=1, generator=g, log_gap=True
        )
        model.zero_grad()
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.metrics, grads
    finally:
        mem.remove()


@pytest.mark.parametrize("kind", ["moe", "bert"])
def test_memdlm_step_with_the_split_equals_the_full_forward_fallback(folders, kind):
    """The split (early layers once, no gradient) is an optimisation: the full-forward fallback
    must give the same losses and gradients (float64)."""
    cfg = recipe_config(folders[kind], memdlm__inner_lr=1.0, memdlm__per_sample=True)
    model = float64(hf.load_model(cfg, device="cpu"))
    x0 = tokens(model.hf.get_input_embeddings().num_embeddings, shape=(2, 12))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    maskable[:, :4] = False
    assert model.split
    split_metrics, split_grads = memdlm_losses(model, cfg, x0, maskable)
    model.split = False
    full_metrics, full_grads = memdlm_losses(model, cfg, x0, maskable)
    assert split_metrics["gap"] > 1e-6  # the inner loop does something
    for key in ("loss", "loss_off", "inner_loss_1", "inner_loss_2"):
        assert split_metrics[key] == pytest.approx(full_metrics[key], rel=1e-10), key
    assert split_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-8, atol=1e-10, msg=name)


def test_outer_lora_trains_only_the_adapters_and_fast_weights_sit_below_them(folders, tmp_path):
    cfg = recipe_config(folders["moe"], model__lora_rank=4, model__lora_alpha=8.0)
    model = hf.load_model(cfg, device="cpu")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    targets = model.fast_weight_targets(0.5)
    assert targets and all(n.endswith(".base_layer") for n in targets)
    x0 = tokens(model.hf.get_input_embeddings().num_embeddings, shape=(2, 12))
    maskable = torch.ones_like(x0, dtype=torch.bool)
    _, grads = memdlm_losses(model, cfg, x0, maskable)
    assert grads and all("lora_" in n for n in grads)


# --------------------------------------------------------------------------- the recipe


def test_train_eval_and_sample_from_the_command_line(folders, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--preset", "smoke", "--quiet", "--data.eval_per_cell", "2"]
    common += ["--eval.exposure_examples", "4", "--memdlm.layer_fraction", "0.5"]
    args = ["train", *common, "--model.path", str(folders["moe"]), "--method", "memdlm"]
    assert main([*args, "--train.steps", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["memdlm"]
    for key in ("eval_loss", "eval_loss_answer_adapted", "eval_loss_adapted"):
        assert 0 < summary[key] < 20, key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and all(r["gap"] == r["gap"] for r in records)
    capsys.readouterr()
    assert main(["eval", str(out), "--method", "memdlm", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_loss"] == pytest.approx(summary["eval_loss"])
    prompt = "lynx code is 7K. the class. lynx code? "
    assert main(["sample", str(out), "--prompt", prompt, "--adapt", "--gen-length", "4"]) == 0
    assert isinstance(capsys.readouterr().out, str)


def test_compare_fine_tunes_the_pretrained_backbone_without_pretraining(folders, tmp_path, capsys):
    out = tmp_path / "compare"
    common = ["--preset", "smoke", "--quiet", "--data.eval_per_cell", "2"]
    common += [
        "--model",
        str(folders["bert"]),
        "--eval.exposure_examples",
        "4",
        "--memdlm.layer_fraction",
        "0.5",
    ]
    assert main(["compare", *common, "--train.steps", "2", "--out", str(out), "--no-cache"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["standard"]["train_loss_final"] > 0 and summary["memdlm"]["eval_loss_adapted"] > 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in records} == {"train"}  # the backbone is the base: no pretraining
    assert not (out / "base" / "model.pt").exists()
    # `eval --model PATH` with no checkpoint evaluates the backbone as loaded: the compare's base.
    capsys.readouterr()
    assert main(["eval", *common]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    assert evaluation["eval_loss"] == pytest.approx(summary["base"]["eval_loss"], rel=1e-6)
    assert evaluation["niah_accuracy"] == summary["base"]["niah_accuracy"]


def test_sample_from_the_backbone_as_loaded(folders, capsys):
    prompt = "lynx code is 7K. lynx code? "
    args = ["sample", "--preset", "smoke", "--model", str(folders["bert"]), "--quiet"]
    assert main([*args, "--prompt", prompt, "--gen-length", "3"]) == 0
    # The same greedy decoding through the Python API, on the weights as loaded.
    cfg = recipe_config(folders["bert"])
    tok = tokenizer_for(cfg)
    ids = torch.tensor([tok.encode(prompt)])
    out = dd.generate(
        hf.load_model(cfg, device="cpu").eval(), ids, mask_id=tok.mask_id, gen_length=3, steps=3
    )
    assert capsys.readouterr().out == tok.decode(out[0, ids.shape[1] :].tolist()) + "\n"


@pytest.mark.gpu
def test_a_bf16_backbone_trains_on_cuda(folders):
    cfg = recipe_config(folders["moe"], model__dtype="bfloat16", memdlm__per_sample=True)
    model = hf.load_model(cfg, device="cuda")
    x0 = tokens(model.hf.get_input_embeddings().num_embeddings, shape=(2, 12)).cuda()
    maskable = torch.ones_like(x0, dtype=torch.bool)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        metrics, grads = memdlm_losses(model, cfg, x0, maskable)
    assert 0 < metrics["loss"] < 20 and all(torch.isfinite(g).all() for g in grads.values())
