"""Write tiny remote-code checkpoints of the LLaDA family into a folder, offline.

`write(family, folder)` puts there what a Hub checkpoint of that family holds: `config.json`
with `auto_map`, the family's `configuration_*.py` / `modeling_*.py` (our own stand-ins from
`remote/`, reproducing the structure and quirks in llada-family-backbones.md), safetensors
weights drawn from a seed, and a byte-level BPE tokenizer trained here with the hub's special
tokens (`<|mdm_mask|>` for LLaDA, `<|mask|>` for the others). Loadable with
`AutoModel*.from_pretrained(folder, trust_remote_code=True)` and `AutoTokenizer`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

REMOTE = Path(__file__).parent / "remote"


@dataclass(frozen=True)
class Family:
    """One family's files, classes, special tokens and tiny config."""

    folder: str  # under remote/
    modules: tuple[str, str]  # configuration, modeling
    config_class: str
    model_class: str
    auto_map: tuple[str, ...]  # auto classes that map to model_class
    specials: tuple[str, ...]  # first ids of the vocabulary, in order
    eos: str
    pad: str
    mask: str
    config: dict = field(default_factory=dict)
    imported: tuple[str, ...] = ()  # more files of `folder` that the modules import
    model_type: str = ""  # config.json's model_type
    extra_rows: int = 0  # embedding rows past the tokenizer (Dream: 152064 vs 151665 + specials)


FAMILIES = {
    "llada": Family(
        "llada",
        ("configuration_llada", "modeling_llada"),
        "LLaDAConfig",
        "LLaDAModelLM",
        ("AutoModel", "AutoModelForCausalLM"),
        ("<|endoftext|>", "<|startoftext|>", "<|eot_id|>", "<|mdm_mask|>"),
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        mask="<|mdm_mask|>",
        model_type="llada",
        config={
            "d_model": 32,
            "n_heads": 2,
            "n_layers": 4,
            "mlp_hidden_size": 64,
            "weight_tying": False,  # as LLaDA-8B ships
            "embedding_dropout": 0.0,
            "attention_dropout": 0.0,
            "residual_dropout": 0.0,
        },
    ),
    "llada_moe": Family(
        "lladamoe",
        ("configuration_lladamoe", "modeling_lladamoe"),
        "LLaDAMoEConfig",
        "LLaDAMoEModelLM",
        ("AutoModel", "AutoModelForCausalLM"),
        ("<|endoftext|>", "<|role_end|>", "<|mask|>"),
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        mask="<|mask|>",
        model_type="lladamoe",
        config={
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "dense_intermediate_size": 64,
            "expert_intermediate_size": 16,
            "shared_expert_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_layer_freq": [0, 1, 1, 1],
            "moe_router_enable_expert_bias": True,
            "partial_rotary_factor": 0.5,
        },
    ),
    "llada2": Family(
        "llada2",
        ("configuration_llada2_moe", "modeling_llada2_moe"),
        "LLaDA2MoeConfig",
        "LLaDA2MoeModelLM",
        ("AutoModel", "AutoModelForCausalLM"),
        ("<|endoftext|>", "<|role_end|>", "<|mask|>"),
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        mask="<|mask|>",
        config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "num_key_value_heads": 0,
            "num_experts": 8,
            "num_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 1,
            "attention_dropout": 0.0,
            "use_cache": True,  # the family's default, kept in the checkpoint
        },
        model_type="llada2_moe",
    ),
    "dream": Family(
        "dream",
        ("configuration_dream", "modeling_dream"),
        "DreamConfig",
        "DreamModel",
        ("AutoModel",),
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"),
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        mask="<|mask|>",
        config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        model_type="Dream",
        extra_rows=16,  # the embedding is larger than the tokenizer, as in the real Dream
    ),
}
# LLaDA2.1: 2.0's structure with what 2.1 changed (remote/llada2/modeling_llada21_moe.py); its
# checkpoints keep config.json's model_type `llada2_moe`.
FAMILIES["llada21"] = replace(
    FAMILIES["llada2"],
    modules=("configuration_llada21_moe", "modeling_llada21_moe"),
    imported=("configuration_llada2_moe", "modeling_llada2_moe"),
)


def corpus() -> list[str]:
    """Training text for the tokenizer: the recipe's own filler and the needle alphabet."""
    from recipes.memdlm.data.tasks import filler_text

    text = filler_text("train")[:20000]
    extra = ["0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ code is VAR = ? ."] * 5
    return [text[i : i + 500] for i in range(0, len(text), 500)] + extra


def write_tokenizer(family: Family, folder: Path, vocab_size: int = 320):
    """A byte-level BPE `PreTrainedTokenizerFast` with the family's special tokens first."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    options = {"eos_token": family.eos, "pad_token": family.pad}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **options)
    if family.folder == "dream":
        return _write_dream_tokenizer(fast, family, folder)
    fast.save_pretrained(folder)
    return fast


def _write_dream_tokenizer(fast, family: Family, folder: Path):
    """Dream's slow tokenizer (remote/dream/tokenization_dream.py): the BPE vocabulary without
    the specials in vocab.json + merges.txt, the specials added after it, a mask token."""
    import transformers

    model = json.loads(fast.backend_tokenizer.to_str())["model"]
    plain = sorted((i, t) for t, i in model["vocab"].items() if t not in family.specials)
    (folder / "vocab.json").write_text(json.dumps({t: n for n, (_, t) in enumerate(plain)}))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n")
    shutil.copy(REMOTE / "dream" / "tokenization_dream.py", folder)
    auto_map = {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    config = {"auto_map": auto_map, "tokenizer_class": "DreamTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    rest = [t for t in family.specials if t not in (family.eos, family.mask)]
    tok.add_special_tokens({"additional_special_tokens": rest, "mask_token": family.mask})
    tok.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    return tok


def write(name: str, folder: Path, *, seed: int = 0, config: dict | None = None) -> Path:
    """Write family `name`'s tiny checkpoint into `folder` (created); returns the folder.
    config: more `config.json` entries, over the family's tiny config."""
    import transformers

    family = FAMILIES[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for module in family.modules + family.imported:
        shutil.copy(REMOTE / family.folder / f"{module}.py", folder / f"{module}.py")
    tok = write_tokenizer(family, folder)
    vocab = tok.get_vocab()
    config = {
        "model_type": family.model_type,
        "architectures": [family.model_class],
        "auto_map": {
            "AutoConfig": f"{family.modules[0]}.{family.config_class}",
            **{auto: f"{family.modules[1]}.{family.model_class}" for auto in family.auto_map},
        },
        "vocab_size": len(tok) + family.extra_rows,
        "eos_token_id": vocab[family.eos],
        "pad_token_id": vocab[family.pad],
        "mask_token_id": vocab[family.mask],
        **family.config,
        **(config or {}),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    loaded = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
    auto = getattr(transformers, family.auto_map[-1])
    torch.manual_seed(seed)
    model = auto.from_config(loaded, trust_remote_code=True)
    model.save_pretrained(folder)
    return folder
