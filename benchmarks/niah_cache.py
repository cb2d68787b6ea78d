"""The accuracy cost of the KV cache on the recipe's own needle-in-a-haystack task.

The shipped base of the default preset (cpu-tiny, `recipes/memdlm/assets`), its held-out
needle cells (tasks x context lengths, 32 examples each), greedy low-confidence decoding with one
token per step and the oracle answer length (`eval.metrics.niah_accuracy`, as `eval` reports it),
with `diffusion.generate(cache=None | "prefix" | "dual")`: exact match per cell and overall, and
how many answers differ from the uncached ones.

    OMP_NUM_THREADS=1 python benchmarks/niah_cache.py [--threshold T] [--cfg-scale W]
        [--gen-length 32 --block-length 8]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import time

import torch

from recipes.memdlm.build import load_weights, new_model
from recipes.memdlm.commands.bases import shipped_base
from recipes.memdlm.config import build_config
from recipes.memdlm.data.prepare import prepare_data
from recipes.memdlm.data.tasks import ByteTokenizer
from recipes.memdlm.eval.metrics import niah_accuracy


def long_generation_accuracy(model, examples, tok, gen_length: int, options: dict) -> dict:
    """Accuracy with `gen_length` generated tokens (one per step): right when the generation
    (read up to EOS) starts with the answer. Every answer is recorded in "samples"."""
    import diffusion as dd

    cells: dict = {}
    for example in examples:
        cells.setdefault((example.task, example.context_len), []).append(example)
    by_task: dict = {}
    samples = []
    for (task, length), group in sorted(cells.items()):
        prompt = torch.tensor([tok.encode(e.prompt) for e in group])
        with torch.no_grad():
            out = dd.generate(
                model, prompt, mask_id=tok.mask_id, gen_length=gen_length, steps=gen_length,
                **options,
            )  # fmt: skip
        answers = [tok.decode(row) for row in out[:, prompt.shape[1] :].tolist()]
        by_task.setdefault(task, {})[length] = sum(
            a.startswith(e.response) for a, e in zip(answers, group)
        ) / len(group)
        samples += [{"output": a} for a in answers]
    return {"by_task": by_task, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-length", type=int, default=None, help="default: one block")
    parser.add_argument("--threshold", type=float, default=None, help="parallel decoding")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance")
    parser.add_argument(
        "--gen-length",
        type=int,
        default=None,
        help="generate this many tokens in blocks of --block-length instead of the oracle "
        "answer length; right = the generation starts with the answer",
    )
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cfg = build_config("cpu-tiny", None, {"device": "cpu"})
    tok = ByteTokenizer()
    model = new_model(cfg, tok, seed=0, device="cpu")
    base = shipped_base(cfg)
    if base is None:
        raise SystemExit("no shipped base for the cpu-tiny preset")
    load_weights(model, base)
    model.eval()
    examples = prepare_data(cfg).accuracy_eval
    results, outputs = {}, {}
    for cache in (None, "prefix", "dual"):
        options = {"cache": cache, "cfg_scale": args.cfg_scale}
        if args.block_length is not None:
            options["block_length"] = args.block_length
        if args.threshold is not None:
            options["threshold"] = args.threshold
        start = time.perf_counter()
        if args.gen_length is None:
            res = niah_accuracy(
                model, examples, tok, batch_size=32, device="cpu", generate_options=options
            )
        else:
            res = long_generation_accuracy(model, examples, tok, args.gen_length, options)
        results[cache] = (res, time.perf_counter() - start)
        outputs[cache] = [s["output"] for s in res["samples"]]
    cells = sorted(
        (task, length) for task, by in results[None][0]["by_task"].items() for length in by
    )
    print(f"torch {torch.__version__}; base {base.name}; {len(examples)} examples")
    print("| task | context bytes | none | prefix | dual |")
    print("|---|---|---|---|---|")
    for task, length in cells:
        accs = [results[c][0]["by_task"][task][length] for c in (None, "prefix", "dual")]
        print(f"| {task} | {length} | " + " | ".join(f"{a:.0%}" for a in accs) + " |")
    overall = []
    for cache in (None, "prefix", "dual"):
        res = results[cache][0]
        accs = [res["by_task"][t][n] for t, n in cells]
        overall.append(sum(accs) / len(accs))
    print("| all | | " + " | ".join(f"{a:.1%}" for a in overall) + " |")
    for cache in ("prefix", "dual"):
        same = sum(a == b for a, b in zip(outputs[cache], outputs[None]))
        print(
            f"{cache}: {same}/{len(outputs[None])} of the first recorded answers equal the "
            f"uncached ones; {results[cache][1]:.1f} s vs {results[None][1]:.1f} s uncached"
        )


if __name__ == "__main__":
    main()
