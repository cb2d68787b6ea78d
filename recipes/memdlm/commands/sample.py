"""`python -m recipes.memdlm sample`: decode a prompt, optionally after adapting fast weights."""

from __future__ import annotations

import math

import torch

from recipes.memdlm.commands.folders import (
    UsageError,
    load_model,
)


def check_sample_args(args) -> None:
    """The decoding options, before any model is loaded, and how they combine (the rules of
    `diffusion.generate`: block length dividing gen-length, whole steps per block)."""
    if args.gen_length < 1:
        raise UsageError(f"--gen-length must be at least 1, got {args.gen_length}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1 (default: --gen-length), got {args.steps}")
    if args.block_length is not None and args.block_length < 1:
        raise UsageError(f"--block-length must be at least 1, got {args.block_length}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.threshold is not None and math.isnan(args.threshold):
        raise UsageError("--threshold must be a number, got nan")
    if getattr(args, "sampler", "diffusion") == "llada21":
        check_llada21_args(args)
        return
    length = args.gen_length
    steps = length if args.steps is None else args.steps
    block = args.block_length or length
    if length % block:
        raise UsageError(f"--gen-length {length} must be a multiple of block_length={block}")
    blocks = length // block
    if steps % blocks:
        raise UsageError(f"--steps {steps} must be a multiple of the number of blocks {blocks}")
    if args.threshold is None and steps // blocks > block:
        raise UsageError(
            f"--steps {steps} gives more steps per block than tokens; at most {length}"
        )
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise UsageError(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    if args.cache_refresh is not None:
        if args.cache == "none":
            raise UsageError("--cache-refresh needs --cache prefix or --cache dual")
        if args.cache_refresh < 1:
            raise UsageError(f"--cache-refresh must be at least 1, got {args.cache_refresh}")


def check_llada21_args(args) -> None:
    """`--sampler llada21`: the options of `diffusion.generate_block_aligned`; the options that
    belong to `diffusion.generate` only must keep their defaults."""
    if args.minimal_topk < 1 or args.minimal_topk > args.gen_length:
        raise UsageError(
            f"--minimal-topk must be between 1 and --gen-length {args.gen_length}, "
            f"got {args.minimal_topk}"
        )
    for name, default in [
        ("remasking", "low_confidence"),
        ("cache", "none"),
        ("cfg_scale", 0.0),
        ("cache_refresh", None),
    ]:
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag} is an option of --sampler diffusion, not of llada21")


def cmd_sample(args, extra, reporter) -> int:

    import diffusion as dd
    from recipes.memdlm import api
    from recipes.memdlm.backbones.hf.cache import CACHED_FAMILIES

    check_sample_args(args)
    cfg, tok, model, device = load_model(args, extra)
    ids = tok.encode(args.prompt)
    if not ids:
        raise UsageError("--prompt is empty")
    length, canvas = len(ids) + args.gen_length, ""
    if args.sampler == "llada21":  # the canvas is padded up to whole blocks
        block = args.block_length or api.LLADA21["block_length"]
        length = -(-length // block) * block
        canvas = f" (a canvas of {length} positions in whole blocks of {block})"
    if length > cfg.model.max_seq_len:
        raise UsageError(
            f"prompt ({len(ids)} tokens) + gen-length {args.gen_length} exceeds the model's "
            f"maximum length {cfg.model.max_seq_len}{canvas}"
        )
    family = getattr(model, "family", None)  # a Hugging Face backbone's (hf.HFDenoiser)
    if args.sampler == "llada21":
        out = sample_llada21(args, cfg, tok, model, torch.tensor([ids], device=device), device)
        print(tok.decode(out[0, len(ids) :].tolist()))
        return 0
    if args.cache != "none" and (
        not dd.supports_cache(model) or (family is not None and family not in CACHED_FAMILIES)
    ):
        raise UsageError(
            f"--cache {args.cache}: the {family or type(model).__name__} backbone has no cached "
            "forward (diffusion.CachedDenoiser); use --cache none"
        )
    prompt = torch.tensor([ids], device=device)
    options = cfg.generate_options()
    if args.cache != "none":
        options.update(cache=args.cache, cache_refresh=args.cache_refresh, compiler=None)
    out = api.generate(  # the cached calls above run eagerly (no compiler)
        model,
        prompt,
        mask_id=tok.mask_id,
        gen_length=args.gen_length,
        steps=args.gen_length if args.steps is None else args.steps,
        adapt=args.adapt,
        config=cfg.memdlm,
        generator=torch.Generator(device=device).manual_seed(args.sample_seed),
        sample_attention=cfg.model.sample_attention,
        sample_block_size=cfg.model.sample_block_size,
        loss_backend=cfg.loss_backend,
        block_length=args.block_length,
        remasking=args.remasking,
        temperature=args.temperature,
        threshold=args.threshold,
        cfg_scale=args.cfg_scale,
        **options,
    )
    print(tok.decode(out[0, len(ids) :].tolist()))
    return 0


def sample_llada21(args, cfg, tok, model, prompt, device):
    """`--sampler llada21`: `diffusion.generate_block_aligned` through `api.generate` (with the
    optional adaptation; `api.llada21_sampling`). Returns the whole canvas; the command decodes
    everything after the prompt, padding included, as the authors' evaluation."""
    from recipes.memdlm import api

    return api.generate(
        model,
        prompt,
        mask_id=tok.mask_id,
        gen_length=args.gen_length,
        adapt=args.adapt,
        config=cfg.memdlm,
        generator=torch.Generator(device=device).manual_seed(args.sample_seed),
        loss_backend=cfg.loss_backend,
        **api.llada21_sampling(
            model,
            block_length=args.block_length,
            steps_per_block=args.steps,
            threshold=args.threshold,
            minimal_topk=args.minimal_topk,
            temperature=args.temperature,
        ),
    )
