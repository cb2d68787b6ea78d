"""Configuration of the MemDLM recipe: one pydantic model, built from a preset, a TOML file and
overrides (`presets.py`, `overrides.py`).

Precedence, lowest first: the preset, then a TOML file (`--config FILE`), then `--key value`
overrides on the command line (dotted keys, e.g. `--memdlm.inner_lr 0.3`). Unknown keys and
out-of-range values are errors (`ConfigError`), reported by the CLI in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from recipes.memdlm.errors import ConfigError, MissingExtraError
from recipes.memdlm.overrides import SHORTHANDS, load_toml, parse_overrides
from recipes.memdlm.presets import PRESETS, VARIANTS, deep_merge, variant_overrides

# Re-exported: the configuration's public names, wherever they are written.
__all__ = [
    "PRESETS",
    "SHORTHANDS",
    "VARIANTS",
    "Config",
    "ConfigError",
    "MissingExtraError",
    "build_config",
    "deep_merge",
    "error_line",
    "load_toml",
    "parse_overrides",
    "variant_config",
    "variant_overrides",
]


class _Strict(BaseModel):
    # allow_inf_nan=False: `--train.lr inf` (or nan) is an error, not a run that diverges.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """The reference denoiser `diffusion.Transformer`."""

    d_model: int = Field(128, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    d_ff: int = Field(256, gt=0)
    max_seq_len: int = Field(512, gt=0)
    # A Hugging Face backbone instead of the reference Transformer (recipes/memdlm/backbones/hf/).
    path: str | None = Field(None, description="Hugging Face model folder or hub id (org/name)")
    adapter: str | None = Field(
        None, description="PEFT LoRA adapter (folder or hub id) loaded onto path; trains on"
    )
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    mask_token: str | None = Field(None, description="default: found in the tokenizer")
    eos_token: str | None = Field(None, description="default: the tokenizer's EOS (or SEP)")
    chat_template: bool = Field(False, description="encode with the tokenizer's chat template")
    lora_rank: int = Field(0, ge=0, description="outer LoRA (peft) rank; 0 = full fine-tuning")
    lora_alpha: float = Field(64.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_targets: list[str] = ["all-linear"]
    load_in_4bit: bool = Field(False, description="NF4 base weights (QLoRA; CUDA, bitsandbytes)")
    # Attention while sampling (training is always bidirectional): LLaDA2.1's sampler attends
    # bidirectionally inside blocks of `sample_block_size` and causally across them.
    sample_attention: Literal["bidirectional", "block_causal"] = "bidirectional"
    sample_block_size: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.adapter and not self.path:
            raise ValueError("model.adapter is loaded onto a Hugging Face model: set model.path")
        if self.sample_attention != "bidirectional" and not self.path:
            raise ValueError(
                "model.sample_attention='block_causal' needs a Hugging Face model (model.path) "
                "whose attention takes 4-D masks (LLaDA2.x, Dream)"
            )
        return self


TaskName = Literal["continuation", "single", "multikey", "multivalue", "vt"]


class CurriculumStage(_Strict):
    """An early stage of pretraining on embedded tasks of its own (easy before hard)."""

    tasks: list[TaskName] = Field(min_length=1)
    context_lengths: list[int] = Field(min_length=1)
    fraction: float = Field(gt=0, lt=1, description="share of pretrain.steps")


class DataConfig(_Strict):
    """Embedded data (generated from a seed) or the user's data files."""

    train_file: str | None = Field(
        None, description="JSONL, JSON, Parquet or a datasets folder (data/formats.py)"
    )
    eval_file: str | None = Field(None, description="held-out file; default: 5% of train_file")
    format: Literal["auto", "prompt_response", "alpaca", "chat"] = Field(
        "auto", description="record shape of the files; auto: from the keys"
    )
    pretrain_tasks: list[TaskName] = ["single"]
    pretrain_context_lengths: list[int] = [48, 64]
    # Stages before the pretraining mixture above, in order, each for its share of the steps
    # (embedded data only: with train_file the base is pretrained on the user's examples).
    pretrain_curriculum: list[CurriculumStage] = []
    train_tasks: list[TaskName] = ["single", "multikey", "multivalue", "vt", "continuation"]
    train_context_lengths: list[int] = [96, 128]
    eval_tasks: list[TaskName] = ["single", "multikey", "multivalue", "vt"]
    eval_context_lengths: list[int] = [96, 128, 192]
    eval_per_cell: int = Field(32, gt=0, description="held-out examples per (task, length)")
    continuation_response_len: int = Field(16, gt=0)
    value_len: int = Field(2, ge=1, le=8, description="needle value: digit, capital, digit...")
    examples_per_cell: int = Field(2000, gt=0, description="training examples per (task, length)")
    max_len_policy: Literal["filter", "truncate"] = "filter"
    seed: int = 0
    # How the 5% held out of train_file is drawn (no eval_file; data/prepare.py held_out_split).
    holdout: Literal["recipe", "datasets"] = "recipe"

    @model_validator(mode="after")
    def _curriculum_leaves_steps(self) -> DataConfig:
        share = sum(stage.fraction for stage in self.pretrain_curriculum)
        if share >= 1:
            raise ValueError(
                f"the pretraining curriculum takes {share:g} of the steps; its fractions must "
                "sum to less than 1 so that the pretraining mixture gets the rest"
            )
        return self


# A period of a phase: a number of steps, or a fraction of its steps (Hugging Face's eval_steps
# and save_steps below 1: ceil(fraction * steps), loop/plan.py).
Every = Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0, lt=1)]


class PhaseConfig(_Strict):
    """One optimisation phase: AdamW with linear warm-up and cosine decay."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    ckpt_every: Every = Field(100, description="steps, or a fraction of the phase (0.1)")
    max_nonfinite_in_row: int = Field(5, ge=1)
    # Hugging Face Trainer's epochs, batches and eval/save fractions (loop/plan.py, data/epochs.py).
    epochs: float | None = Field(None, gt=0, description="set: steps = ceil(epochs * batches)")
    batch_per_device: int | None = Field(None, ge=1, description="set: global batch = this x GPUs")
    group_by_length: bool = Field(False, description="HF group_by_length epoch batches")
    eval_every: Every | None = Field(None, description="held-out loss every N steps or fraction")
    # "trainer": Hugging Face Trainer's cosine warm-up, ceil(ratio * steps) steps from lr 0.
    schedule: Literal["recipe", "trainer"] = "recipe"
    tensorboard: bool = Field(False, description="also log scalars as TensorBoard events")


class MemDLMConfig(_Strict):
    """The inner loop (memdlm-method.md section 2); defaults are the paper's values.

    Every option names the reference code's (JarvisPei/MemDLM, `memdlm/memory.py`) equivalent in
    docs/memdlm.md, "Options of the reference code"; the formulas are there too.
    """

    # memory.py `masking_strategy`: pmc (= progressive_memory_consistent), pre_only,
    # no_progressive, progressive_memory; anchor_only is the recipe's own (one step on x_t
    # weighted by its realised ratio; no_progressive weights it by the sampled t).
    strategy: Literal["pmc", "pre_only", "anchor_only", "no_progressive", "progressive_memory"] = (
        "pmc"
    )
    inner_steps: int = Field(2, ge=1, description="K; pmc with K>2 reveals evenly in between")
    inner_epochs: int = Field(1, ge=1, description="passes over the trajectory (num_inner_epochs)")
    s_pre: float = Field(1.5, ge=1.0, description="pre-anchor mask ratio = min(1, s_pre * r)")
    inner_lr: float = Field(0.1, ge=0)
    grad_transform: Literal["clip", "normalize"] = "clip"
    inner_clip: float = Field(1.0, gt=0, description="per-tensor max norm (grad_transform=clip)")
    inner_loss_mask: Literal["student_masked", "newly_revealed"] = "student_masked"
    # memory.py `inner_loss_type`: cross-entropy against x0, or distillation from the same
    # model with the current fast weights on the next (less masked) state, without gradient.
    inner_loss: Literal["ce", "distill", "distill_reverse", "distill_hidden"] = "ce"
    distill_temperature: float = Field(1.0, gt=0)
    distill_hidden_type: Literal["mse", "cosine"] = "mse"
    # "early": the hidden states after the first max(1, int(L * layer_fraction)) layers (the
    # reference code's negative inner_layer_fraction); "last": the final features.
    distill_hidden_layers: Literal["last", "early"] = "last"
    fast_weights: Literal["lora", "full"] = "lora"
    rank: int = Field(32, ge=1)
    alpha: float = Field(64.0, gt=0)
    layer_fraction: float = Field(0.1, gt=0, le=1)
    targets: list[str] = ["gate_proj", "up_proj", "down_proj"]
    per_sample: bool = False
    prompt_anchor_ratio: float = Field(0.2, gt=0, le=1, description="inference-time anchor")
    gap_every: int = Field(1, ge=1, description="log the same-batch fast-weights-off gap")
    # The leak-free control (not in the reference code): the outer loss scores only a random
    # part O of the anchor's masked positions (each with probability leak_free_fraction, weight
    # 1/(t q) so that the expected loss is the standard one); every inner input masks O and no
    # inner loss scores it, so the inner loop never sees the outer step's targets.
    leak_free: bool = False
    leak_free_fraction: float = Field(0.5, gt=0, lt=1)

    def inner_passes(self) -> int:
        """Forward/backward passes of the inner loop per training step (all epochs)."""
        if self.strategy in ("pre_only", "anchor_only", "no_progressive"):
            return self.inner_epochs
        return self.inner_steps * self.inner_epochs


class StandardConfig(_Strict):
    """The Standard baseline; `anchors` > 1 is the compute-matched control."""

    # Independent anchors (t, M_t) per batch, the loss averaged over them: one forward and
    # backward pass each. "matched": as many as a MemDLM step makes (inner passes + 1).
    anchors: Annotated[int, Field(ge=1)] | Literal["matched"] = 1


class DistributedConfig(_Strict):
    """Multi-process training under torchrun (recipes/memdlm/loop/parallel.py, docs/scaling.md)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    sync_inner: bool = Field(False, description="all-reduce shared fast-weight gradients")


class EvalConfig(_Strict):
    batch_size: int = Field(32, ge=1)
    exposure_examples: int = Field(32, ge=1, description="continuations for the R_EB curve")
    # false: the run's final evaluation is its held-out losses only; at the paper's scale the
    # generation-based scores are lm-eval's (`harness`, docs/reproduce.md).
    generation: bool = Field(True, description="needle accuracy and exposure-bias curves")


class Config(_Strict):
    preset: str = "cpu-tiny"
    method: Literal["standard", "memdlm"] = "memdlm"
    seed: int = 1
    seeds: int = Field(1, ge=1, description="compare: paired seeds seed, seed+1, ...")
    device: str = "auto"
    time_eps: float = Field(1e-3, gt=0, lt=1, description="t ~ U[time_eps, 1] per sequence")
    kernels: Literal["auto", "reference", "triton", "off"] = "auto"
    compile: bool = False

    @property
    def loss_backend(self) -> str | None:
        """The fused loss's backend for the step functions; None = the plain logits path."""
        return None if self.kernels == "off" else self.kernels

    def generate_options(self) -> dict[str, Any]:
        """Keyword arguments of `diffusion.generate` that follow `kernels` and `compile`."""
        import torch

        backend = "reference" if self.kernels == "off" else self.kernels
        return {"backend": backend, "compiler": torch.compile if self.compile else None}

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PhaseConfig = PhaseConfig(steps=2000, lr=3e-3, log_every=50, ckpt_every=250)
    train: PhaseConfig = PhaseConfig(steps=300, lr=5e-4, log_every=25, ckpt_every=100)
    memdlm: MemDLMConfig = MemDLMConfig()
    standard: StandardConfig = StandardConfig()
    eval: EvalConfig = EvalConfig()
    distributed: DistributedConfig = DistributedConfig()
    # compare: extra runs against Standard on the same paired seeds (names in VARIANTS).
    variants: list[str] = []

    def standard_anchors(self) -> int:
        """Anchors per batch of the Standard method (`standard.anchors`, resolved)."""
        if self.standard.anchors == "matched":
            return self.memdlm.inner_passes() + 1
        return self.standard.anchors

    @field_validator("variants", mode="before")
    @classmethod
    def _one_variant(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `--variants leak_free`

    @model_validator(mode="after")
    def _epochs_train_only(self) -> Config:
        p = self.pretrain  # the pretraining samplers draw at random (data.prepare)
        if p.epochs or p.group_by_length or p.batch_per_device or p.eval_every:
            raise ValueError(
                "epochs, group_by_length, batch_per_device and eval_every are train.* options"
            )
        return self

    @model_validator(mode="after")
    def _known_variants(self) -> Config:
        for name in self.variants:
            variant_overrides(name)  # raises for an unknown name
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants: a name is repeated in {self.variants}")
        return self


def variant_config(cfg: Config, name: str) -> tuple[str, Config]:
    """The method and the configuration of variant `name` of the run `cfg`."""
    method, overrides = variant_overrides(name)
    tree = deep_merge(cfg.model_dump(), overrides)
    tree["variants"] = []
    return method, Config.model_validate(tree)


def _first_error(error: ValidationError) -> str:
    item = error.errors()[0]
    where = ".".join(str(part) for part in item["loc"]) or "config"
    if item["type"] == "extra_forbidden":
        return f"unknown config key {where!r}"
    value = item.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{where}: {item['msg']}{shown}"


def error_line(error: Exception) -> str:
    """One line for an error: pydantic's first validation problem, else the first line."""
    if isinstance(error, ValidationError):
        return _first_error(error)
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def build_config(
    preset: str = "cpu-tiny",
    toml_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """The effective configuration: preset, then TOML file, then overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    tree = PRESETS[preset]()
    if toml_file is not None:
        tree = deep_merge(tree, load_toml(toml_file))
    if overrides:
        tree = deep_merge(tree, overrides)
    tree["preset"] = preset
    try:
        return Config.model_validate(deep_merge(Config().model_dump(), tree))
    except ValidationError as error:
        raise ConfigError(_first_error(error)) from None
