"""MemDLM at inference, for a model you loaded yourself: adapt fast weights to a prompt, sample.

    import recipes.memdlm as memdlm
    out = memdlm.generate(model, prompt_ids, mask_id=126336, gen_length=64, steps=64)

"Train & Inference" (arXiv 2603.22241, memdlm-method.md section 3.2): before sampling, fresh
fast weights (LoRA on the FFN of the last layers) take the training-time inner steps on the
prompt alone: a random `prompt_anchor_ratio` (20%) of the prompt is masked (the anchor), a nested
noisier pre-anchor state adds more, and each step predicts the clean prompt tokens at the masked
positions (uniform weights, mean over masked tokens). The adapted weights stay bound while the
answer is sampled and are dropped afterwards; every prompt of a batch gets its own.

The model may be the reference `diffusion.Transformer`, an `hf.HFDenoiser` (`hf.wrap(model)` of a
Hugging Face model), or any module mapping tokens (B, L) to logits (B, L, V) (or to an output
with `.logits`) that has a `layers` stack or comes with `fast_weights`. Models without the split
forward of the first two run whole forward passes in the inner loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

import diffusion as dd
import memory as mm
from recipes.memdlm.backbones import adapter, split_forward
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.method import adapt_to_prompt, make_fast_weights


def _denoiser(model):
    """`model` with the recipe's split-forward calls (`backbones.split_forward`)."""
    if not callable(model):
        raise TypeError(f"model must be callable (tokens -> logits), got {type(model).__name__}")
    return split_forward(model)


def memdlm_config(config: MemDLMConfig | Mapping[str, Any] | None) -> MemDLMConfig:
    """A `MemDLMConfig` from None (the paper's values), a config, or a dict of its fields."""
    if config is None:
        return MemDLMConfig()
    if isinstance(config, MemDLMConfig):
        return config
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(MemDLMConfig.model_fields))
        if unknown:
            raise ValueError(
                f"config has unknown keys {unknown}; expected fields of MemDLMConfig "
                f"({sorted(MemDLMConfig.model_fields)})"
            )
        return MemDLMConfig(**config)
    raise TypeError(f"config must be a MemDLMConfig, a dict or None, got {type(config).__name__}")


def fast_weights_for(model, config: MemDLMConfig | Mapping[str, Any] | None = None):
    """Fast weights on `model` as the recipe places them: LoRA (`rank`, `alpha`) or full deltas on
    the FFN projections (`targets`) of the last `layer_fraction` of `model.layers`. The caller
    owns them: `mem.remove()` takes the hooks off."""
    cfg = memdlm_config(config)
    adapter(model).fast_weight_targets(cfg.layer_fraction, tuple(cfg.targets))  # TypeError
    return make_fast_weights(model, cfg)


def adapt_prompt(
    model,
    prompt_ids: torch.Tensor,
    *,
    mask_id: int,
    fast_weights: mm.FastWeights,
    config: MemDLMConfig | Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    loss_backend: str | None = "auto",
) -> dict[str, torch.Tensor]:
    """Fast weights adapted to each prompt: the inner loop on the prompt alone (module doc).

    prompt_ids: (B, P) long, no `mask_id`. fast_weights: attached to `model` (`fast_weights_for`).
    config: inner-loop settings (`MemDLMConfig` fields: inner_lr, inner_steps, s_pre,
    grad_transform, inner_clip, prompt_anchor_ratio, ...). Returns the detached state, one set per
    prompt (leading dim B), to bind with `fast_weights.bind(state)`.
    """
    if (
        not isinstance(prompt_ids, torch.Tensor)
        or prompt_ids.dim() != 2
        or prompt_ids.is_floating_point()
    ):
        raise ValueError(
            f"prompt_ids must be a (B, P) integer tensor, got "
            f"{getattr(prompt_ids, 'shape', type(prompt_ids).__name__)}"
        )
    if prompt_ids.shape[1] == 0:
        raise ValueError("prompt_ids is empty: there is no prompt to adapt to (use adapt=False)")
    if bool((prompt_ids == mask_id).any()):
        raise ValueError(f"prompt_ids contains the mask id {mask_id}")
    cfg = memdlm_config(config)
    if not callable(model):
        raise TypeError(f"model must be callable (tokens -> logits), got {type(model).__name__}")
    return adapt_to_prompt(
        adapter(model),
        fast_weights,
        prompt_ids,
        cfg,
        mask_id=mask_id,
        generator=generator,
        loss_backend=loss_backend,
    )


def generate(
    model,
    prompt_ids: torch.Tensor,
    *,
    mask_id: int,
    gen_length: int,
    steps: int | None = None,
    adapt: bool = True,
    fast_weights: mm.FastWeights | None = None,
    config: MemDLMConfig | Mapping[str, Any] | None = None,
    generator: torch.Generator | None = None,
    sample_attention: str = "bidirectional",
    sample_block_size: int | None = None,
    loss_backend: str | None = "auto",
    sampler: Callable[..., torch.Tensor] | None = None,
    **sampler_options,
) -> torch.Tensor:
    """Sample `gen_length` tokens after each prompt, after adapting fast weights to it.

    The one sampling path of the recipe: the `sample` command and the lm-eval model call it.

    Args:
        model: see the module doc.
        prompt_ids: (B, P) long prompts (one length; no left padding when adapting).
        mask_id, gen_length, steps: as `diffusion.generate` (`steps` is required by it and
            not taken by another `sampler`).
        adapt: run inference-time adaptation first (False = plain sampling).
        fast_weights: fast weights attached to `model` (kept afterwards); None = made here from
            `config` (`fast_weights_for`) and removed when done.
        config: `MemDLMConfig` or a dict of its fields; None = the paper's values (LoRA rank 32,
            alpha 64 on gate/up/down_proj of the last 10% of layers; two inner SGD steps, lr
            0.1, per-tensor clip 1; anchor 20% of the prompt).
        generator: random source of the adaptation masks, the LoRA init and the sampler noise
            (None = torch's global random state, as torch's own functions: repeated calls
            give different samples; pass a seeded generator to reproduce one).
        sample_attention, sample_block_size: the attention while sampling (`model.
            sample_attention`: "block_causal" is LLaDA2.x's sampler, for the Hugging Face
            backbones that take 4-D masks); the adaptation stays bidirectional, as training.
        loss_backend: the adaptation's loss kernel (`loss_backend` of the recipe's config).
        **sampler_options: passed to `diffusion.generate` (block_length, remasking,
            temperature, threshold, callback, eos_id, stop_at_eos, cache="prefix" | "dual",
            cache_refresh, cfg_scale, ...). With `cfg_scale` > 0 the unconditional rows (the
            prompt masked) keep the adapted fast weights of their prompt (`guided_state`).
            With `cache`, a model with the `diffusion.CachedDenoiser` methods is sampled
            through them, with the adapted fast weights bound in the cached and in the fresh
            calls alike.

        sampler: None = `diffusion.generate`; else a function with its calling convention
            `sampler(model, prompt_ids, mask_id=, gen_length=, generator=, **sampler_options)`,
            e.g. `diffusion.generate_block_aligned` (LLaDA2.x's sampler; give it the block-causal
            `sample_attention` of a Hugging Face LLaDA2 backbone).

    Returns:
        (B, P + gen_length) tokens without `mask_id` (another `sampler` returns what it
        returns: `generate_block_aligned` the whole block-padded canvas); the prompt is
        unchanged.
    """
    if sampler is None:
        if steps is None:
            raise ValueError("steps is required by diffusion.generate (sampler=None)")
        sampler = functools.partial(dd.generate, steps=steps)
    elif steps is not None:
        raise ValueError("steps is diffusion.generate's; pass another sampler's own step options")
    if adapt and sampler_options.get("attention_mask") is not None:
        raise ValueError("adapt=True needs unpadded prompts of one length (no attention_mask)")
    denoiser = _denoiser(model)
    if sampler_options.get("cache") is not None and dd.supports_cache(model):
        denoiser = model  # its own cached forward (a FullForward view would hide it)

    def sample() -> torch.Tensor:
        attention = adapter(model).sampling_attention(sample_attention, sample_block_size)
        with attention:
            return sampler(
                denoiser,
                prompt_ids,
                mask_id=mask_id,
                gen_length=gen_length,
                generator=generator,
                **sampler_options,
            )

    if not adapt:
        return sample()
    owned = fast_weights is None
    mem = fast_weights_for(model, config) if owned else fast_weights
    try:
        phi = adapt_prompt(
            model,
            prompt_ids,
            mask_id=mask_id,
            fast_weights=mem,
            config=config,
            generator=generator,
            loss_backend=loss_backend,
        )
        with torch.no_grad(), mem.bind(guided_state(phi, sampler_options.get("cfg_scale", 0))):
            return sample()
    finally:
        if owned:
            mem.remove()


LLADA21 = {"block_length": 32, "threshold": 0.95, "minimal_topk": 1}  # the authors' evaluation


def llada21_sampling(
    model,
    *,
    block_length: int | None = None,
    steps_per_block: int | None = None,
    threshold: float | None = None,
    minimal_topk: int | None = None,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """Keyword arguments of `generate` for the LLaDA2.1 sampler of the authors' evaluation
    (`diffusion.generate_block_aligned`; None takes their value, `LLADA21`): block-causal
    attention in blocks of `block_length` for a Hugging Face backbone, as they run LLaDA2.1,
    bidirectional for the reference Transformer. Used by `sample --sampler llada21` and the
    lm-eval model's `sampler=llada21`."""
    block = block_length or LLADA21["block_length"]
    hf = getattr(model, "family", None) is not None  # hf.HFDenoiser
    return {
        "sampler": dd.generate_block_aligned,
        "block_length": block,
        "steps_per_block": steps_per_block,
        "threshold": LLADA21["threshold"] if threshold is None else threshold,
        "minimal_topk": minimal_topk or LLADA21["minimal_topk"],
        "temperature": temperature,
        "sample_attention": "block_causal" if hf else "bidirectional",
        "sample_block_size": block,
    }


def guided_state(state: Mapping[str, torch.Tensor] | None, cfg_scale: float | None):
    """A per-sample fast-weight state of B prompts for the rows `diffusion.generate` runs:
    unchanged without guidance; with `cfg_scale` > 0 (2B rows: the B conditional rows, then
    the B unconditional ones with the prompt masked) repeated along dim 0, so each
    unconditional row keeps its prompt's adapted weights. None stays None."""
    if state is None or not cfg_scale:
        return state
    return {key: torch.cat([value, value]) for key, value in state.items()}


def shared_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One prompt's per-sample fast-weight state (every tensor with a leading dim of 1, as
    `adapt_prompt` returns for a (1, P) prompt) as a shared state (that dim dropped).

    `FastWeights.bind` applies a shared state to every row of the input, whatever the batch
    size; a per-sample state must match the input's batch size exactly (it is not broadcast).
    Binding the shared state equals binding the state repeated along dim 0 to the batch size.
    """
    out = {}
    for key, value in state.items():
        if value.dim() < 1 or value.shape[0] != 1:
            raise ValueError(
                f"state[{key!r}] has shape {tuple(value.shape)}; expected a leading dim of 1 "
                "(the adapted state of a single prompt)"
            )
        out[key] = value[0]
    return out


def log_likelihood(
    model,
    prompt_ids: torch.Tensor,
    response_ids: torch.Tensor,
    *,
    mask_id: int,
    state: Mapping[str, torch.Tensor] | None = None,
    fast_weights: mm.FastWeights | None = None,
    mc_num: int = 128,
    mc_batch: int = 32,
    generator: torch.Generator | None = None,
    cfg_scale: float = 0.0,
) -> torch.Tensor:
    """Monte Carlo ELBO of log p(response | prompt) for B responses after one prompt, with
    that prompt's adapted fast weights bound (or none).

    The estimator is `diffusion.elbo_log_likelihood` (stratified numbers of masked tokens,
    unbiased): each forward pass runs B * mc_batch rows (the prompt repeated, the response
    partly masked). `state` is one prompt's state (`adapt_prompt` on a (1, P) prompt, leading
    dim 1) or a shared state; it is bound as a shared state (`shared_state`), so all
    B * mc_batch rows see the same adapted weights.

    Args:
        prompt_ids: (P,) or (1, P) long, P >= 0, no `mask_id`.
        response_ids: (B, R) long, R >= 1, no `mask_id`; every row follows the same prompt.
        state, fast_weights: the adapted state and the fast weights it belongs to (both or
            neither).
        mc_num: Monte Carlo samples per response; mc_batch: samples per response per forward.
        generator: random source of the masks (None = seeded with 0).
        cfg_scale: w >= 0, LLaDA's classifier-free guidance inside the estimate (its
            `get_log_likelihood`): every forward's logits become `un + (w + 1)(cond - un)`,
            `un` with the prompt positions masked (`Guided`); 0 = none.

    Returns:
        (B,) float64 ELBO estimates in nats (a lower bound on log p for an exact denoiser).
    """
    if (state is None) != (fast_weights is None):
        raise ValueError("state and fast_weights go together: pass both or neither")
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() not in (1, 2):
        raise ValueError(f"prompt_ids must be a (P,) or (1, P) tensor, got {prompt_ids!r}")
    prompt = prompt_ids.reshape(1, -1)
    if not isinstance(response_ids, torch.Tensor) or response_ids.dim() != 2:
        raise ValueError("response_ids must be a (B, R) tensor")
    if generator is None:
        generator = torch.Generator(device=prompt.device).manual_seed(0)
    rows = prompt.expand(response_ids.shape[0], -1)

    if isinstance(cfg_scale, bool) or not 0 <= cfg_scale < float("inf"):
        raise ValueError(f"cfg_scale must be a finite float >= 0, got {cfg_scale!r}")
    denoiser = _denoiser(model)
    if cfg_scale > 0:
        denoiser = Guided(denoiser, prompt.shape[1], mask_id=mask_id, cfg_scale=cfg_scale)

    def estimate() -> torch.Tensor:
        return dd.elbo_log_likelihood(
            denoiser,
            rows,
            response_ids,
            mask_id=mask_id,
            mc_num=mc_num,
            batch_size=mc_batch,
            generator=generator,
        )

    if state is None:
        return estimate()
    shapes = fast_weights.state_shapes
    is_shared = all(tuple(state[k].shape) == shapes[k] for k in shapes if k in state)
    with torch.no_grad(), fast_weights.bind(state if is_shared else shared_state(state)):
        return estimate()


class Guided:
    """A denoiser with LLaDA's classifier-free guidance, for likelihoods: each call runs the
    rows and the rows with their first `prompt_length` positions set to `mask_id` in one batch
    (2N rows, a shared fast-weight state applies to all) and returns `un + (w + 1)(cond - un)`
    on the raw logits. (`diffusion.generate(cfg_scale=...)` does the same while sampling.)"""

    def __init__(self, model, prompt_length: int, *, mask_id: int, cfg_scale: float):
        self.model, self.prompt_length = model, prompt_length
        self.mask_id, self.cfg_scale = mask_id, float(cfg_scale)

    def __call__(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        unconditional = x.clone()
        unconditional[:, : self.prompt_length] = self.mask_id
        rows = torch.cat([x, unconditional])
        if attention_mask is None:
            out = self.model(rows)
        else:
            out = self.model(rows, attention_mask=torch.cat([attention_mask, attention_mask]))
        cond, uncond = getattr(out, "logits", out).chunk(2)
        return uncond + (self.cfg_scale + 1) * (cond - uncond)
