"""The memory model of docs/scaling.md (recipes/memdlm/estimate.py): its parameter counts are
the real ones, and its terms scale as their formulas say."""

from __future__ import annotations

import pytest
import torch

import diffusion as dd
import memory as mm
from recipes.memdlm.estimate import GIB, Shape, estimate, lora_parameters, main


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameters_and_fast_weights_of_the_reference_transformer():
    model = dd.Transformer(100, d_model=32, n_layers=5, n_heads=4, d_ff=48)
    shape = Shape("ref", layers=5, hidden=32, intermediate=48, heads=4, kv_heads=4, vocab=100)
    assert shape.parameters() == count(model)
    for fraction, rank in [(0.1, 8), (0.4, 4), (1.0, 2)]:
        mem = mm.FastLoRA(model, mm.last_layers(model, fraction), rank=rank, alpha=1.0)
        state = mem.init()
        assert shape.fast_weight_parameters(fraction, rank) == sum(
            v.numel() for v in state.values()
        )
        mem.remove()


@pytest.mark.parametrize("kind", ["llama", "qwen2_moe"])
def test_parameters_of_hugging_face_models_from_their_config(kind):
    transformers = pytest.importorskip("transformers")
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, intermediate_size=48)
    if kind == "llama":
        config = transformers.LlamaConfig(**sizes, attention_bias=True)
        model = transformers.LlamaForCausalLM(config)
    else:
        sizes.update(moe_intermediate_size=16, shared_expert_intermediate_size=24)
        config = transformers.Qwen2MoeConfig(**sizes, num_experts=4, num_experts_per_tok=2)
        model = transformers.Qwen2MoeForCausalLM(config)
    shape = Shape.from_config(config.to_dict())
    assert shape.parameters() == count(model)
    if kind == "qwen2_moe":  # one fast LoRA per routed expert, as hf.fast_weight_targets places
        from recipes.memdlm.backbones import hf

        wrapped = hf.wrap(model, layer_fraction=0.4, verify_split=False)
        names = [n for n in wrapped.fast_weight_targets(0.4) if ".experts." in n]
        mem = mm.FastLoRA(wrapped, names, rank=4, alpha=1.0)
        numel = sum(v.numel() for v in mem.init().values())
        assert shape.fast_weight_parameters(0.4, 4) == numel


def test_terms_follow_their_formulas():
    shape = Shape("s", layers=4, hidden=64, intermediate=256, heads=4, kv_heads=2, vocab=1000)
    p = shape.parameters()
    ddp = estimate(shape, mode="ddp", gpus=8)
    fsdp = estimate(shape, mode="fsdp", gpus=8)
    assert ddp["weights"] == pytest.approx(4 * p / GIB)
    for key in ("weights", "gradients", "optimizer"):  # FSDP shards the states over 8 GPUs
        assert fsdp[key] == pytest.approx(ddp[key] / 8)
    assert ddp["optimizer"] == pytest.approx(2 * ddp["gradients"])  # two fp32 moments
    lora, qlora = estimate(shape, mode="lora"), estimate(shape, mode="qlora")
    assert lora["gradients"] == pytest.approx(4 * lora_parameters(shape, 32) / GIB)
    assert qlora["weights"] < lora["weights"] < ddp["weights"]
    double = estimate(shape, mode="ddp", seq_len=8192)
    assert double["activations"] == pytest.approx(2 * ddp["activations"])  # linear in L
    one = estimate(shape, mode="ddp", micro_batch=1, per_sample=True)
    four = estimate(shape, mode="ddp", micro_batch=4, per_sample=True)
    assert four["memdlm_extra"] == pytest.approx(4 * one["memdlm_extra"])
    assert ddp["total"] == pytest.approx(sum(v for k, v in ddp.items() if k != "total"))
    with pytest.raises(ValueError, match="mode must be"):
        estimate(shape, mode="zero3")


def test_the_command_prints_the_table(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,')
    config.write_text(config.read_text() + ' "num_attention_heads": 4, "vocab_size": 500}')
    assert main([str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| model |") and len(lines) == 2 + 4  # one row per mode
