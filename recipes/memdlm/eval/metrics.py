"""Evaluation: held-out loss three ways, needle accuracy, and the exposure-bias ratio curve.

Every model is scored on the same held-out examples with the same precomputed anchors, so
differences between methods are paired, not noise from different masks.

- "off": fast weights off, the base model theta alone (MemDLM "Train-Only"; Standard).
- "adapted": after the training-time inner loop on the example's own answer tokens. This is what
  the paper plots; it flatters MemDLM (the inner loop sees the targets).
- "prompt": after inference-time adaptation on the prompt alone ("Train & Inference").
"""

from __future__ import annotations

import collections
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from recipes.memdlm import api
from recipes.memdlm.config import MemDLMConfig
from recipes.memdlm.data.batches import Batch, Encoded, collate, fixed_batches
from recipes.memdlm.data.tasks import ByteTokenizer, Example
from recipes.memdlm.method import (
    Anchor,
    adapt_on_trajectory,
    adapt_to_prompt,
    sample_anchor,
    standard_loss,
)

EVAL_SEED = 20260325  # fixed: every run and method sees the same anchors and adaptation masks


@dataclass
class LossSet:
    """Held-out batches with their fixed anchors."""

    batches: list[Batch]
    anchors: list[Anchor]


def make_loss_set(rows: Sequence[Encoded], batch_size: int, tok: ByteTokenizer, device) -> LossSet:
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    batches = [b.to(device) for b in fixed_batches(rows, batch_size, tok.eos_id)]
    anchors = [
        sample_anchor(b, mask_id=tok.mask_id, eps=1e-3, generator=generator) for b in batches
    ]
    return LossSet(batches, anchors)


def make_grouped_loss_set(rows: Sequence[Encoded], batch_size: int, tok, device) -> LossSet:
    """A `LossSet` whose batches share one prompt length (prompt-only adaptation needs it) and
    one total length (a model's own tokenizer: no padding token of ours); anchors from the
    evaluation seed, as `make_loss_set`."""

    groups: dict[tuple[int, int], list[Encoded]] = collections.defaultdict(list)
    for row in rows:
        groups[(len(row.prompt), len(row))].append(row)
    batches = []
    for key in sorted(groups):
        group = groups[key]
        for i in range(0, len(group), batch_size):
            batches.append(collate(group[i : i + batch_size], tok.eos_id).to(device))
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED)
    anchors = [
        sample_anchor(b, mask_id=tok.mask_id, eps=1e-3, generator=generator) for b in batches
    ]
    return LossSet(batches, anchors)


def _weighted_mean(values: list[float], weights: list[int]) -> float:
    return sum(v * w for v, w in zip(values, weights)) / max(1, sum(weights))


def eval_loss(
    model,
    loss_set: LossSet,
    *,
    mode: str = "off",
    mem=None,
    cfg=None,
    mask_id=None,
    loss_backend: str | None = "auto",
):
    """Mean outer loss over the held-out set, weighted by maskable tokens per batch.

    loss_backend: the fused loss from hidden states (`method.standard_loss`), None for logits.
    """
    if mode != "off" and (mem is None or cfg is None):
        raise ValueError(f"mode {mode!r} needs fast weights and their config")
    generator = torch.Generator(device=loss_set.batches[0].x0.device).manual_seed(EVAL_SEED + 1)
    values, weights = [], []
    model.eval()
    for batch, anchor in zip(loss_set.batches, loss_set.anchors):
        phi = None
        if mode == "adapted":
            phi = _gold_adaptation(model, mem, batch, anchor, cfg, mask_id, generator, loss_backend)
        elif mode == "prompt":
            phi = _prompt_adaptation(model, mem, batch, cfg, mask_id, generator, loss_backend)
        per_sample = phi is not None and mem.batch_size(phi) is not None
        with torch.no_grad(), mem.bind(phi) if phi is not None else nullcontext():
            loss = standard_loss(model, batch, anchor, loss_backend, per_sample=per_sample)
            values.append(loss.item())
        weights.append(int(batch.maskable.sum()))
    return _weighted_mean(values, weights)


def _gold_adaptation(model, mem, batch, anchor, cfg: MemDLMConfig, mask_id, generator, backend):
    """The training-time inner loop on the example's own answer (memdlm-method.md 2.2)."""
    return adapt_on_trajectory(
        model,
        mem,
        batch.x0,
        batch.maskable,
        anchor.mask,
        cfg,
        mask_id=mask_id,
        generator=generator,
        per_sample=cfg.per_sample,
        loss_backend=backend,
    ).phi


def _prompt_adaptation(model, mem, batch: Batch, cfg, mask_id, generator, backend):
    """Prompt-only adaptation; rows of a batch share one prompt length (equal-length cells)."""
    prompt_len = int(batch.prompt_lengths[0])
    if not bool((batch.prompt_lengths == prompt_len).all()):
        raise ValueError("prompt adaptation needs rows of equal prompt length")
    prompt = batch.x0[:, :prompt_len]
    return adapt_to_prompt(
        model, mem, prompt, cfg, mask_id=mask_id, generator=generator, loss_backend=backend
    )


def _generate(model, prompt, gen_length, tok: ByteTokenizer, callback=None, options=None):
    """Greedy low-confidence sampling, one token per step, through the recipe's one sampling
    path (`api.generate`; fast weights, when adapted, are bound by the caller). options: its
    keyword arguments (`sample_attention`, kernels and compiler settings)."""
    return api.generate(
        model,
        prompt,
        mask_id=tok.mask_id,
        gen_length=gen_length,
        steps=gen_length,
        adapt=False,
        remasking="low_confidence",
        temperature=0.0,
        callback=callback,
        **(options or {}),
    )


def niah_accuracy(
    model,
    examples: Sequence[Example],
    tok: ByteTokenizer,
    *,
    batch_size: int,
    device,
    mem=None,
    cfg: MemDLMConfig | None = None,
    adapt_prompt: bool = False,
    generate_options: dict | None = None,
    loss_backend: str | None = "auto",
) -> dict[str, dict]:
    """Exact-match accuracy of greedy low-confidence sampling, one token per step.

    The generation length is the answer's length plus its EOS (an oracle length, as in fixed-length
    DLM evaluations); a prediction is right when the decoded bytes before EOS equal the answer.
    Returns {"by_length": {len: acc}, "by_task": {task: {len: acc}}, "chars_by_length":
    {len: per-character accuracy}, "samples": [...]}.
    """
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED + 2)
    cells: dict[tuple[str, int], list[Example]] = defaultdict(list)
    for example in examples:
        cells[(example.task, example.context_len)].append(example)
    correct: dict[tuple[str, int], int] = {}
    chars: dict[tuple[str, int], float] = {}
    samples = []
    model.eval()
    for (task, length), group in sorted(cells.items()):
        hits, char_hits = 0, 0.0
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            prompt = torch.tensor([tok.encode(e.prompt) for e in chunk], device=device)
            gen_length = len(tok.encode(chunk[0].response)) + 1
            phi = None
            if adapt_prompt:
                phi = adapt_to_prompt(
                    model,
                    mem,
                    prompt,
                    cfg,
                    mask_id=tok.mask_id,
                    generator=generator,
                    loss_backend=loss_backend,
                )
            with torch.no_grad(), mem.bind(phi) if phi is not None else nullcontext():
                out = _generate(model, prompt, gen_length, tok, options=generate_options)
            for example, row in zip(chunk, out[:, prompt.shape[1] :].tolist()):
                answer = tok.decode(row)
                hits += answer == example.response
                char_hits += _char_accuracy(answer, example.response)
                if len(samples) < 64:
                    samples.append(
                        {
                            "task": task,
                            "length": length,
                            "target": example.response,
                            "output": answer,
                        }
                    )
        correct[(task, length)] = hits
        chars[(task, length)] = char_hits
    by_task: dict[str, dict[int, float]] = defaultdict(dict)
    for (task, length), hits in correct.items():
        by_task[task][length] = hits / len(cells[(task, length)])
    lengths = sorted({length for _, length in cells})
    by_length = {
        length: sum(correct[k] for k in cells if k[1] == length)
        / sum(len(cells[k]) for k in cells if k[1] == length)
        for length in lengths
    }
    chars_by_length = {
        length: sum(chars[k] for k in cells if k[1] == length)
        / sum(len(cells[k]) for k in cells if k[1] == length)
        for length in lengths
    }
    return {
        "by_length": by_length,
        "by_task": dict(by_task),
        "chars_by_length": chars_by_length,
        "samples": samples,
    }


def _char_accuracy(output: str, target: str) -> float:
    """Fraction of the target's characters reproduced at their position (a graded score that
    resolves differences exact match cannot at small scale)."""
    return sum(a == b for a, b in zip(output, target)) / max(1, len(target))


def exposure_bias_curve(
    model,
    examples: Sequence[Example],
    tok: ByteTokenizer,
    *,
    device,
    mem=None,
    cfg: MemDLMConfig | None = None,
    adapt_prompt: bool = False,
    generate_options: dict | None = None,
    loss_backend: str | None = "auto",
) -> list[float]:
    """R_EB(k) = L_seq(k) / L_static(k) at each denoising step k (paper Fig. 3).

    Sequential decoding (greedy, low-confidence, one token per step) from a fully masked response.
    At step k, with S_k the still-masked positions: L_seq is the mean NLL of the true tokens at S_k
    given the model's own partially decoded sequence; L_static the same NLL given the ground truth
    everywhere outside S_k. Examples must share prompt and response lengths.
    """
    rows = [
        Encoded(tuple(tok.encode(e.prompt)), (*tok.encode(e.response), tok.eos_id))
        for e in examples
    ]
    if len({len(r.prompt) for r in rows}) != 1 or len({len(r) for r in rows}) != 1:
        raise ValueError("exposure-bias examples must share prompt and response lengths")
    batch = collate(rows, tok.eos_id).to(device)
    prompt_len = int(batch.prompt_lengths[0])
    gen_length = batch.x0.shape[1] - prompt_len
    seq_nll: list[float] = []
    static_nll: list[float] = []
    generator = torch.Generator(device=device).manual_seed(EVAL_SEED + 3)
    phi = None
    if adapt_prompt:
        phi = adapt_to_prompt(
            model,
            mem,
            batch.x0[:, :prompt_len],
            cfg,
            mask_id=tok.mask_id,
            generator=generator,
            loss_backend=loss_backend,
        )

    def nll(logits: torch.Tensor, masked: torch.Tensor) -> float:
        logp = torch.log_softmax(logits.float(), dim=-1)
        token = logp.gather(-1, batch.x0.unsqueeze(-1)).squeeze(-1)
        return float(-(token * masked).sum() / masked.sum().clamp(min=1))

    def on_step(info) -> None:
        masked = info.tokens == tok.mask_id
        seq_nll.append(nll(info.logits, masked))
        static_input = torch.where(masked, tok.mask_id, batch.x0)
        static_nll.append(nll(model(static_input), masked))

    model.eval()
    with torch.no_grad(), mem.bind(phi) if phi is not None else nullcontext():
        prompt = batch.x0[:, :prompt_len]
        _generate(model, prompt, gen_length, tok, callback=on_step, options=generate_options)
    return [s / max(t, 1e-12) for s, t in zip(seq_nll, static_nll)]
