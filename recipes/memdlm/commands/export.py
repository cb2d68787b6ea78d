"""`python -m recipes.memdlm export RUN --out DIR [--merged]`: a trained run as a PEFT adapter
folder, a transformers `save_pretrained` folder, or the reference Transformer's safetensors
(recipes/memdlm/backbones/export.py)."""

from __future__ import annotations

import json

from recipes.memdlm.commands.folders import (
    checkpoint_config,
    checkpoint_file,
    fresh_folder,
    removed_on_user_error,
)


def cmd_export(args, extra, reporter) -> int:
    from recipes.memdlm.backbones.export import export_run
    from recipes.memdlm.build import load_weights, new_model
    from recipes.memdlm.data.prepare import tokenizer_for

    checkpoint = checkpoint_file(args.run)
    out = fresh_folder(args.out)
    cfg = checkpoint_config(args, extra, checkpoint)
    # On the CPU, the base in its own dtype: a 4-bit run's adapter merges into real weights.
    model_cfg = cfg.model.model_copy(update={"load_in_4bit": False})
    cfg = cfg.model_copy(update={"device": "cpu", "model": model_cfg})
    tok = tokenizer_for(cfg)
    model = new_model(cfg, tok, seed=0, device="cpu")
    load_weights(model, checkpoint)
    model.eval()
    with removed_on_user_error(out):
        kind = export_run(model, cfg, tok, out, merged=args.merged)
    reporter.note(f"exported {checkpoint} as {kind} to {out}")
    print(json.dumps({"out": str(out), "format": kind}))
    return 0
