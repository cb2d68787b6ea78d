"""Every held-out metric of one trained model, for either method (the run's evaluation)."""

from __future__ import annotations

from typing import Any

from recipes.memdlm.config import Config
from recipes.memdlm.data.prepare import Data
from recipes.memdlm.eval.metrics import (
    LossSet,
    eval_loss,
    exposure_bias_curve,
    make_grouped_loss_set,
    make_loss_set,
    niah_accuracy,
)
from recipes.memdlm.method import make_fast_weights

# The needle result of a run evaluated without generation (`eval.generation=false`).
NONE: dict[str, Any] = {"by_length": {}, "by_task": {}, "chars_by_length": {}, "samples": []}


def loss_set_for(data: Data, cfg: Config, device) -> LossSet:
    """The held-out loss batches with their fixed anchors, for either kind of backbone."""
    if not data.tokenizer.bytes_are_tokens:  # batches of one prompt length
        return make_grouped_loss_set(data.loss_eval, cfg.eval.batch_size, data.tokenizer, device)
    return make_loss_set(data.loss_eval, cfg.eval.batch_size, data.tokenizer, device)


def evaluate_model(
    model, data: Data, cfg: Config, *, method: str, device, loss_set: LossSet | None = None
) -> dict[str, Any]:
    """All held-out metrics of one trained model. MemDLM gets the adapted variants too."""
    tok = data.tokenizer
    loss_set = loss_set or loss_set_for(data, cfg, device)
    backend = {"loss_backend": cfg.loss_backend}
    # Sampling attends as `model.sample_attention` (inside `api.generate`); losses and the
    # prompt adaptation stay bidirectional, as in training and in `sample --adapt`.
    m = cfg.model
    options = {"sample_attention": m.sample_attention, "sample_block_size": m.sample_block_size}
    sampling = {"generate_options": {**cfg.generate_options(), **options}, **backend}
    common = {"batch_size": cfg.eval.batch_size, "device": device, **sampling}

    result: dict[str, Any] = {"eval_loss": eval_loss(model, loss_set, **backend)}
    generation = cfg.eval.generation
    result["niah"] = niah_accuracy(model, data.accuracy_eval, tok, **common) if generation else NONE
    result["exposure_bias"] = (
        exposure_bias_curve(model, data.exposure_eval, tok, device=device, **sampling)
        if generation
        else []
    )
    if method == "memdlm":
        mem = make_fast_weights(model, cfg.memdlm)
        try:
            fast = {"mem": mem, "cfg": cfg.memdlm}
            # Two adaptations: "answer_adapted" runs the training step's inner half on the
            # answer itself (what the paper plots; it sees the targets), "adapted" adapts to
            # the prompt alone (what inference can do, "Train & Inference").
            result["eval_loss_answer_adapted"] = eval_loss(
                model, loss_set, mode="adapted", mask_id=tok.mask_id, **fast, **backend
            )
            result["eval_loss_adapted"] = eval_loss(
                model, loss_set, mode="prompt", mask_id=tok.mask_id, **fast, **backend
            )
            result["niah_adapted"], result["exposure_bias_adapted"] = NONE, []
            if generation:
                result["niah_adapted"] = niah_accuracy(
                    model, data.accuracy_eval, tok, adapt_prompt=True, **common, **fast
                )
                result["exposure_bias_adapted"] = exposure_bias_curve(
                    model,
                    data.exposure_eval,
                    tok,
                    device=device,
                    adapt_prompt=True,
                    **fast,
                    **sampling,
                )
        finally:
            mem.remove()
    return result
