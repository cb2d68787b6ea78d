"""Memory per GPU for MemDLM training at scale: a transparent back-of-the-envelope model.

`python -m recipes.memdlm.estimate [CONFIG.json ...]` prints the table of docs/scaling.md (for
the shapes in `SHAPES`, or for Hugging Face config files). Every term is a formula in the code
below; nothing is measured. Assumptions (bytes per GPU; P = parameters, N = GPUs, b = sequences
per GPU, L = tokens per sequence, d = hidden size):

- weights: fp32 master weights for full fine-tuning (4P, or 4P/N sharded by FSDP), bf16 frozen
  weights for LoRA (2P), NF4 for QLoRA (~0.516 bytes/param: 4 bits + double-quantised scales);
  trainable LoRA weights in fp32;
- gradients 4 bytes and AdamW moments 8 bytes per trainable parameter (/N under FSDP);
- activations saved for backward, bf16, no activation checkpointing (fast weights are bound only
  during the forward pass, so a recomputation in backward would not see them), flash/SDPA
  attention (no L x L scores): per layer 2 b L (6 d + 2 d_kv + 2 d + 4 i) bytes, i the FFN
  width a token goes through (dense intermediate, or top-k experts' plus the shared expert's);
- logits: b L V x 6 bytes (bf16 logits and their fp32 log-softmax) at a time;
- MemDLM: fast weights, their gradient and update in fp32 (x b when per sample), plus the inner
  loop's transient: the fast-weight layers' activations, the logits and the K early hidden
  states, held while the anchor's early-layer activations are alive.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
NF4_BYTES = 4.127 / 8  # 4-bit weights + one fp8 scale per 64 + one fp32 per 256 scales


@dataclass(frozen=True)
class Shape:
    """A Llama/OLMoE-style decoder (SwiGLU FFN, optionally MoE) by its sizes."""

    name: str
    layers: int
    hidden: int
    intermediate: int  # dense FFN width (0 when every layer is MoE)
    heads: int
    kv_heads: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0  # one shared expert of this width, 0 = none
    tied: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q, k, v
    attention_bias: bool = False  # Llama's option: biases on q, k, v, o

    @classmethod
    def from_config(cls, config: dict, name: str = "config") -> Shape:
        """Sizes from a Hugging Face `config.json` (Llama, Qwen2/3-MoE, OLMoE, LLaDA names)."""

        def get(*keys, default=0):
            for key in keys:
                if config.get(key) is not None:
                    return int(config[key])
            return default

        heads = get("num_attention_heads", "n_heads")
        experts = get("num_experts", "num_local_experts", "n_routed_experts")
        return cls(
            name=name,
            layers=get("num_hidden_layers", "n_layers"),
            hidden=get("hidden_size", "d_model"),
            intermediate=0 if experts else get("intermediate_size", "mlp_hidden_size"),
            heads=heads,
            kv_heads=get("num_key_value_heads", "n_kv_heads", default=heads),
            vocab=get("vocab_size", "embedding_size"),
            experts=experts,
            top_k=get("num_experts_per_tok", "moe_top_k") if experts else 0,
            expert_intermediate=get("moe_intermediate_size", "expert_intermediate_size"),
            shared_intermediate=get("shared_expert_intermediate_size")
            or get("num_shared_experts") * get("moe_intermediate_size"),  # LLaDA2
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("qkv_bias", False)),
            attention_bias=bool(config.get("attention_bias", False)),
        )

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def ffn_parameters(self) -> int:
        d = self.hidden
        if not self.experts:
            return 3 * d * self.intermediate
        routed = self.experts * 3 * d * self.expert_intermediate + self.experts * d  # + router
        shared = 3 * d * self.shared_intermediate + d if self.shared_intermediate else 0
        return routed + shared  # the shared expert has a scalar gate (d -> 1)

    def layer_parameters(self) -> int:
        d = self.hidden
        attention = 2 * d * d + 2 * d * self.kv_dim  # q, o; k, v
        if self.qkv_bias or self.attention_bias:
            attention += d + 2 * self.kv_dim + (d if self.attention_bias else 0)
        return attention + self.ffn_parameters() + 2 * d  # two RMSNorm weights

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_parameters() + embeddings + self.hidden  # final norm

    def active_width(self) -> int:
        """FFN width one token goes through."""
        if not self.experts:
            return self.intermediate
        return self.top_k * self.expert_intermediate + self.shared_intermediate

    def fast_layers(self, fraction: float) -> int:
        # memory.first_of_last_layers's rule, written out: this module stays free of torch
        # (tests/recipes/method/test_step.py checks that the two agree).
        first = min(int(self.layers * (1 - fraction)), self.layers - 1)
        return self.layers - first

    def fast_weight_parameters(self, fraction: float = 0.1, rank: int = 32) -> int:
        """LoRA A (r, in) and B (out, r) on gate/up/down of every FFN (every routed expert) of
        the last `fraction` of layers; rank (in + out) per projection."""
        d = self.hidden
        if self.experts:
            per_layer = self.experts * 3 * rank * (d + self.expert_intermediate)
        else:
            per_layer = 3 * rank * (d + self.intermediate)
        return self.fast_layers(fraction) * per_layer


def lora_parameters(shape: Shape, rank: int) -> int:
    """Outer LoRA on the attention and FFN projections of every layer (every expert): rank
    (in + out) each; routers and the head get none."""
    d, kv = shape.hidden, shape.kv_dim
    attention = rank * ((d + d) * 2 + (d + kv) * 2)
    if shape.experts:
        ffn = shape.experts * 3 * rank * (d + shape.expert_intermediate)
        ffn += 3 * rank * (d + shape.shared_intermediate) if shape.shared_intermediate else 0
    else:
        ffn = 3 * rank * (d + shape.intermediate)
    return shape.layers * (attention + ffn)


def estimate(
    shape: Shape,
    *,
    mode: str,
    seq_len: int = 4096,
    micro_batch: int = 1,
    gpus: int = 8,
    lora_rank: int = 32,
    fast_rank: int = 32,
    fraction: float = 0.1,
    inner_steps: int = 2,
    per_sample: bool = False,
) -> dict[str, float]:
    """GiB per GPU by component (module doc). mode: "ddp" / "fsdp" (full fine-tuning, fp32
    master weights), "lora" (bf16 frozen base + outer LoRA) or "qlora" (NF4 base + LoRA)."""
    if mode not in ("ddp", "fsdp", "lora", "qlora"):
        raise ValueError(f"mode must be 'ddp', 'fsdp', 'lora' or 'qlora', got {mode!r}")
    p = shape.parameters()
    shard = gpus if mode == "fsdp" else 1
    if mode in ("ddp", "fsdp"):
        trainable, weights = p, 4 * p / shard
    else:
        trainable = lora_parameters(shape, lora_rank)
        weights = (2 if mode == "lora" else NF4_BYTES) * p + 4 * trainable
    b, n, d = micro_batch, seq_len, shape.hidden
    per_layer = 2 * b * n * (6 * d + 2 * shape.kv_dim + 2 * d + 4 * shape.active_width())
    logits = b * n * shape.vocab * 6
    fast = shape.fast_weight_parameters(fraction, fast_rank) * 4 * (b if per_sample else 1)
    inner = shape.fast_layers(fraction) * per_layer + logits + inner_steps * 2 * b * n * d
    parts = {
        "weights": weights,
        "gradients": 4 * trainable / shard,
        "optimizer": 8 * trainable / shard,
        "activations": shape.layers * per_layer + logits,
        "memdlm_extra": 3 * fast + inner,
    }
    result = {k: v / GIB for k, v in parts.items()}
    result["total"] = sum(result.values())
    return result


def trainable_parameters(shape: Shape, *, mode: str, lora_rank: int = 32) -> int:
    """Parameters AdamW updates: all of them (full fine-tuning) or the outer LoRA's."""
    return shape.parameters() if mode in ("ddp", "fsdp") else lora_parameters(shape, lora_rank)


def disk(shape: Shape, *, mode: str, lora_rank: int = 32) -> dict[str, float]:
    """GiB on disk of a run folder (loop/checkpoint.py, loop/phase.py).

    checkpoint.pt: the weights that train (fp32) and AdamW's two fp32 moments per trainable
    parameter. Full fine-tuning saves the whole model; a LoRA or QLoRA run only its adapter,
    the frozen base being named, not copied (`checkpoint.model_payload`). There is one,
    rewritten atomically (a new file beside the old one, then a rename), so the peak holds two
    of it and, at the end, model.pt (the saved weights once more).
    """
    p, trainable = shape.parameters(), trainable_parameters(shape, mode=mode, lora_rank=lora_rank)
    weights = 4 * (p if mode in ("ddp", "fsdp") else trainable)
    checkpoint = weights + 8 * trainable
    return {
        "checkpoint": checkpoint / GIB,
        "model": weights / GIB,
        "peak": (2 * checkpoint + weights) / GIB,
    }


def run_time(
    *,
    steps: int,
    tokens_per_step: float,
    tokens_per_second: float,
    gpus: int,
    eval_tokens: float = 0.0,
    eval_cost: float = 1 / 3,
) -> dict[str, float]:
    """Seconds per step and for the run at `tokens_per_second` per GPU (training tokens, the
    method's own step: MemDLM's is ~1.3x Standard's, docs/memdlm.md "Cost"), N GPUs in data
    parallel. eval_tokens: held-out tokens of all periodic evaluations together, each costing
    `eval_cost` of a training token (a forward pass without backward: about 1/3)."""
    if tokens_per_second <= 0 or gpus < 1:
        raise ValueError(f"tokens_per_second > 0 and gpus >= 1 needed, got {tokens_per_second}")
    per_step = tokens_per_step / (tokens_per_second * gpus)
    evals = eval_tokens * eval_cost / (tokens_per_second * gpus)
    return {
        "step": per_step,
        "train": steps * per_step,
        "eval": evals,
        "total": steps * per_step + evals,
    }


# Sizes used in docs/scaling.md. LLaDA-8B follows its published config; the LLaDA-MoE entry
# assumes OLMoE's shape (16 layers, d 2048, 64 experts of width 1024, top 8) with a 157,184-token
# vocabulary: read the real file with `python -m recipes.memdlm.estimate config.json`.
SHAPES = (
    Shape("1B dense", 16, 2048, 8192, 32, 8, 128256, tied=True),
    Shape("LLaDA-MoE-7B-A1B (assumed)", 16, 2048, 0, 16, 16, 157184, 64, 8, 1024),
    Shape("LLaDA-8B", 32, 4096, 12288, 32, 32, 126464),
)
MODES = (("fsdp", 8), ("ddp", 8), ("lora", 1), ("qlora", 1))


def table(shapes=SHAPES, seq_len: int = 4096) -> str:
    rows = [
        "| model | params | mode | GPUs | weights | grads | AdamW | activations | MemDLM extra "
        "| total GiB/GPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in shapes:
        for mode, gpus in MODES:
            e = estimate(shape, mode=mode, seq_len=seq_len, gpus=gpus)
            rows.append(
                f"| {shape.name} | {shape.parameters() / 1e9:.2f}B | {mode} | {gpus} | "
                f"{e['weights']:.1f} | {e['gradients']:.1f} | {e['optimizer']:.1f} | "
                f"{e['activations']:.1f} | {e['memdlm_extra']:.1f} | {e['total']:.1f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    shapes = [Shape.from_config(json.loads(Path(p).read_text()), name=p) for p in paths]
    print(table(shapes or SHAPES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
