"""`python -m recipes.memdlm estimate`: what a training run will cost before it starts.

From the run's configuration (preset, `--config`, overrides, exactly as `train` reads them):
the model's shape (its `config.json`, or the reference Transformer's sizes), the plan (steps
from epochs, global batch, evaluations; `loop/plan.py`) and the data's token counts, it prints
memory per GPU (`estimate.estimate`), disk (`estimate.disk`), time per step and for the run
(`estimate.run_time`) from a stated (`--tokens-per-second`) or measured (`--probe-steps`)
throughput, and whether it fits in `--gpu-memory`. `train` prints the same lines (without
time) at its start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from recipes.memdlm import estimate as est
from recipes.memdlm.commands.folders import UsageError, config_from_args
from recipes.memdlm.config import Config


def shape_of(cfg: Config, vocab: int | None = None) -> est.Shape:
    """The backbone's sizes: a Hugging Face `config.json` (`model.path`), else the reference
    Transformer's (`model.*`, the byte tokenizer's vocabulary unless `vocab` is given)."""
    m = cfg.model
    if m.path:
        path = Path(m.path) / "config.json"
        if not path.is_file():
            raise UsageError(f"model.path {m.path!r} has no config.json to size the model by")
        return est.Shape.from_config(json.loads(path.read_text()), name=Path(m.path).name)
    if vocab is None:
        from recipes.memdlm.data.tasks import ByteTokenizer

        vocab = ByteTokenizer().vocab_size
    return est.Shape("reference", m.n_layers, m.d_model, m.d_ff, m.n_heads, m.n_heads, vocab)


def mode_of(cfg: Config) -> str:
    """The estimate's training mode: qlora, lora, or full fine-tuning by the strategy."""
    if cfg.model.load_in_4bit:
        return "qlora"
    if cfg.model.lora_rank:
        return "lora"
    return "fsdp" if cfg.distributed.strategy == "fsdp" else "ddp"


def token_counts(plan, rows, eval_rows: int, eval_mean: float, *, seed: int, phase) -> dict:
    """Padded tokens per step (the mean over one epoch's batches, or 200 random ones) and of
    all periodic evaluations, from the encoded rows (`rows`: their lengths)."""
    from recipes.memdlm.data.batches import Encoded
    from recipes.memdlm.loop.plan import sampler_for

    fake = [Encoded((), tuple(range(n))) for n in rows]
    sampler = sampler_for(phase, plan, fake, seed=seed, eos_id=0)
    draws = plan.steps_per_epoch or 200
    total = 0
    for index in range(draws):
        if plan.steps_per_epoch is None:
            total += sampler.next().x0.numel()
        else:  # lengths alone: no tensors for a 12k-row epoch
            picks = sampler.indices(0, index)
            total += len(picks) * max(rows[i] for i in picks)
    # at steps every, 2 every, ... before the last (which the final evaluation of `train` follows)
    evals = (plan.steps - 1) // plan.eval_every if plan.eval_every else 0
    return {"per_step": total / draws, "eval": evals * eval_rows * eval_mean, "evals": evals}


def describe(cfg: Config, *, gpus: int, rows: list[int], eval_rows: list[int], vocab=None):
    """The estimate as a dict of numbers (GiB, seconds without throughput) for `gpus` GPUs."""
    from recipes.memdlm.loop.plan import plan_phase

    shape, mode = shape_of(cfg, vocab), mode_of(cfg)
    plan = plan_phase(cfg.train, len(rows), gpus)
    mem = cfg.memdlm
    memory = est.estimate(
        shape, mode=mode, seq_len=min(cfg.model.max_seq_len, max(rows)),
        micro_batch=plan.per_device, gpus=gpus, lora_rank=cfg.model.lora_rank or 32,
        fast_rank=mem.rank, fraction=mem.layer_fraction, inner_steps=mem.inner_passes(),
        per_sample=mem.per_sample,
    )  # fmt: skip
    if cfg.method == "standard":
        memory["total"] -= memory.pop("memdlm_extra")
    eval_mean = sum(eval_rows) / max(1, len(eval_rows))
    tokens = token_counts(plan, rows, len(eval_rows), eval_mean, seed=cfg.seed, phase=cfg.train)
    return {
        "shape": shape,
        "mode": mode,
        "plan": plan,
        "memory": memory,
        "disk": est.disk(shape, mode=mode, lora_rank=cfg.model.lora_rank or 32),
        "tokens": tokens,
    }


def lines(found: dict, *, gpus: int, gpu_memory=None, tokens_per_second=None) -> list[str]:
    """The estimate in words."""
    shape, plan, memory, disk = found["shape"], found["plan"], found["memory"], found["disk"]
    extra = f", MemDLM {size(memory['memdlm_extra'])}" if "memdlm_extra" in memory else ""
    out = [
        f"model {shape.name}: {count(shape.parameters())} parameters, {found['mode']}",
        plan.describe(),
        f"memory per GPU: {size(memory['total'])} (weights {size(memory['weights'])}, "
        f"activations {size(memory['activations'])}, optimizer {size(memory['optimizer'])}"
        f"{extra})",
        f"disk: checkpoint {size(disk['checkpoint'])}, model.pt {size(disk['model'])}, "
        f"peak {size(disk['peak'])}",
    ]
    if gpu_memory is not None:
        fits = memory["total"] <= gpu_memory
        out.append(
            f"fits: {'yes' if fits else 'NO'} ({size(memory['total'])} of {gpu_memory:g} GiB "
            "per GPU)"
        )
    if tokens_per_second is not None:
        t = est.run_time(
            steps=plan.steps, tokens_per_step=found["tokens"]["per_step"],
            tokens_per_second=tokens_per_second, gpus=gpus, eval_tokens=found["tokens"]["eval"],
        )  # fmt: skip
        out.append(
            f"time: {t['step']:.2f} s per step ({found['tokens']['per_step']:.0f} tokens at "
            f"{tokens_per_second:.0f} tokens/s per GPU), {hours(t['train'])} for {plan.steps} "
            f"steps + {hours(t['eval'])} for {found['tokens']['evals']} evaluations = "
            f"{hours(t['total'])}"
        )
    return out


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def note_at_start(cfg: Config, data, gpus: int, reporter) -> None:
    """The estimate's lines (no time: no throughput yet) as `train` starts; "fits" against the
    GPU's memory on CUDA."""
    import torch

    rows, eval_rows = [len(r) for r in data.train], [len(r) for r in data.loss_eval]
    try:
        found = describe(cfg, gpus=gpus, rows=rows, eval_rows=eval_rows)
    except (ArithmeticError, KeyError, TypeError, ValueError, UsageError) as error:
        # a config.json the size model cannot read must not stop training
        reporter.note(f"estimate: not available for this model ({error})")
        return
    memory = None
    if torch.cuda.is_available() and str(cfg.device) != "cpu":
        memory = torch.cuda.get_device_properties(0).total_memory / est.GIB
    for line in lines(found, gpus=gpus, gpu_memory=memory)[2:]:  # train prints its own plan
        reporter.note(f"estimate: {line}")


def size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds:.0f} s"


def cmd_estimate(args, extra, reporter) -> int:
    from recipes.memdlm.data.prepare import prepare_data

    if args.gpus < 1 or (args.gpu_memory is not None and args.gpu_memory <= 0):
        raise UsageError(f"--gpus must be >= 1 and --gpu-memory > 0 (got {args.gpus})")
    cfg = config_from_args(args, extra, method=args.method)
    data = prepare_data(cfg)
    rows, eval_rows = [len(r) for r in data.train], [len(r) for r in data.loss_eval]
    found = describe(cfg, gpus=args.gpus, rows=rows, eval_rows=eval_rows)
    throughput = args.tokens_per_second
    if args.probe_steps:
        throughput = probe(cfg, data, args.probe_steps, reporter)
    for line in lines(
        found, gpus=args.gpus, gpu_memory=args.gpu_memory, tokens_per_second=throughput
    ):
        reporter.out.print(line, markup=False, highlight=False, soft_wrap=True)
    if throughput is None:
        reporter.out.print(
            "time: give --tokens-per-second (per GPU) or --probe-steps N to measure it here"
        )
    return 0


def probe(cfg: Config, data, steps: int, reporter) -> float:
    """Training tokens per second on this device: `steps` + 1 steps of the configured run in a
    temporary folder, the first (warm-up, compilation) left out."""
    import tempfile

    from recipes.memdlm.build import new_model, resolve_device
    from recipes.memdlm.commands.runs import fine_tune
    from recipes.memdlm.loop.steps import MetricsLog

    update = {"steps": steps + 1, "epochs": None, "eval_every": None, "ckpt_every": 10**9}
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})
    device = resolve_device(cfg.device, cfg.kernels)
    model = new_model(cfg, data.tokenizer, seed=cfg.seed, device=device)
    with tempfile.TemporaryDirectory(prefix="memdlm-probe-") as folder:
        fine_tune(model, cfg, data, Path(folder), run=cfg.method, seed=cfg.seed, reporter=reporter)
        records = MetricsLog(Path(folder) / "metrics.jsonl", {"phase": "train"}).records()
    timed = records[1:] or records
    rate = sum(r["tokens"] for r in timed) / max(1e-9, sum(r["seconds"] for r in timed))
    if not math.isfinite(rate) or rate <= 0:
        raise UsageError("the probe measured no throughput; give --tokens-per-second")
    reporter.note(f"probe: {rate:.0f} training tokens/s on {device} over {len(timed)} steps")
    return rate
