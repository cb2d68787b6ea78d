"""`python -m recipes.memdlm eval`: every held-out metric of a trained model."""

from __future__ import annotations

from recipes.memdlm.commands.folders import (
    load_model,
)


def cmd_eval(args, extra, reporter) -> int:
    import json

    from recipes.memdlm.data.prepare import prepare_data
    from recipes.memdlm.eval.suite import evaluate_model

    cfg, _, model, device = load_model(args, extra)
    data = prepare_data(cfg)
    result = evaluate_model(model, data, cfg, method=args.method, device=device)
    result = {k: v for k, v in result.items() if not k.startswith("niah")} | {
        "niah_accuracy": result["niah"]["by_length"],
        **(
            {"niah_accuracy_adapted": result["niah_adapted"]["by_length"]}
            if "niah_adapted" in result
            else {}
        ),
    }
    print(json.dumps(result, indent=2, default=str))
    return 0
