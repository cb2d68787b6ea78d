"""`python -m recipes.memdlm data`: what the model will see of `data.train_file`.

Every example of the file, in file order, encoded as a training row (the run's tokenizer,
`model.chat_template`, the length policy at `model.max_seq_len`), one JSON object per line:
`{"input_ids": [...], "prompt_length": n}`, the ids before any padding; `input_ids[:n]` is the
prompt (never masked, never scored), the rest is scored. Examples the length policy filters are
left out and counted on stderr. Without `data.train_file` the embedded training set is encoded
(and stderr says so).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from recipes.memdlm.commands.folders import config_from_args

SCORED = ("<scored>", "</scored>")  # marks the scored part in `--show`


def encoded_rows(cfg):
    """(tokenizer, rows, report, source) of `data.train_file` (or the embedded training set)."""
    from recipes.memdlm.data.batches import encode
    from recipes.memdlm.data.chat import require_template
    from recipes.memdlm.data.formats import load_examples
    from recipes.memdlm.data.prepare import builtin_examples, tokenizer_for

    tok = tokenizer_for(cfg)
    if cfg.model.chat_template:
        require_template(tok)
    if cfg.data.train_file:
        examples, source = load_examples(cfg.data.train_file, cfg.data.format), cfg.data.train_file
    else:
        examples, source = builtin_examples(cfg)["train"], "the embedded training set"
    rows, report = encode(
        examples,
        tok,
        max_len=cfg.model.max_seq_len,
        policy=cfg.data.max_len_policy,
        chat_template=cfg.model.chat_template,
    )
    return tok, rows, report, source


def visible_text(tok, ids) -> str:
    """The ids as text with every special token written out (EOS, template tokens)."""
    ids = [int(i) for i in ids]
    if hasattr(tok, "tokenizer"):  # a Hugging Face tokenizer
        return tok.tokenizer.decode(ids, skip_special_tokens=False)
    names = {tok.eos_id: "<eos>", tok.pad_id: "<pad>", tok.mask_id: "<mask>"}
    out, pending = [], bytearray()
    for token in ids:
        if token < 256:
            pending.append(token)
            continue
        out += [pending.decode("utf-8", errors="replace"), names[token]]
        pending = bytearray()
    return "".join(out) + pending.decode("utf-8", errors="replace")


def show(tok, rows, count: int) -> None:
    for number, row in enumerate(rows[:count], start=1):
        print(
            f"example {number} ({len(row)} tokens: {len(row.prompt)} prompt, "
            f"{len(row.response)} scored)"
        )
        prompt, scored = visible_text(tok, row.prompt), visible_text(tok, row.response)
        print(f"{prompt}{SCORED[0]}{scored}{SCORED[1]}\n")


def cmd_data(args, extra, reporter) -> int:
    cfg = config_from_args(args, extra)
    tok, rows, report, source = encoded_rows(cfg)
    print(f"{source}: {report.describe(cfg.model.max_seq_len)}", file=sys.stderr)
    lines = (
        json.dumps({"input_ids": [*row.prompt, *row.response], "prompt_length": len(row.prompt)})
        for row in rows
    )
    if args.jsonl is not None:
        path = Path(args.jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as handle:
            handle.writelines(line + "\n" for line in lines)
    if args.show:
        show(tok, rows, args.show)
    elif args.jsonl is None:
        sys.stdout.writelines(line + "\n" for line in lines)
    return 0
