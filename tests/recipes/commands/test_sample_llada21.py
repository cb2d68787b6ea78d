"""`python -m recipes.memdlm sample --sampler llada21`: the LLaDA2.1 sampler of the authors'
evaluation (`diffusion.generate_block_aligned`) through the command, in process, against the
library call; its argument checks; `api.generate(sampler=...)`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import diffusion as dd
from recipes.memdlm import api, method
from recipes.memdlm.cli import main
from recipes.memdlm.commands.folders import UsageError
from recipes.memdlm.commands.sample import check_sample_args

PROMPT = "amber code is 1234. "


def loaded(run_dir):
    from recipes.memdlm.eval.harness_setup import load_run

    run = load_run(run_dir, device="cpu")
    return run.config, run.tokenizer, run.model


def test_the_command_prints_the_library_samplers_canvas_after_the_prompt(run_dir, capsys):
    args = ["--prompt", PROMPT, "--gen-length", "7", "--block-length", "8", "--steps", "3"]
    assert main(["sample", str(run_dir), "--sampler", "llada21", *args, "--threshold", "0.5"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    cfg, tok, model = loaded(run_dir)
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        out = dd.generate_block_aligned(
            model, ids, mask_id=tok.mask_id, gen_length=7, block_length=8, steps_per_block=3,
            threshold=0.5,
        )  # fmt: skip
    assert out.shape[1] == 32  # 20 + 7 positions, padded to 4 blocks of 8
    assert printed == tok.decode(out[0, ids.shape[1] :].tolist())


def test_the_command_adapts_then_samples_with_the_block_aligned_sampler(run_dir, capsys):
    args = ["--prompt", PROMPT, "--gen-length", "6", "--block-length", "4", "--adapt"]
    assert main(["sample", str(run_dir), "--sampler", "llada21", *args, "--seed", "3"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    cfg, tok, model = loaded(run_dir)
    ids = torch.tensor([tok.encode(PROMPT)])
    generator = torch.Generator().manual_seed(3)
    mem = method.make_fast_weights(model, cfg.memdlm)
    phi = method.adapt_to_prompt(
        model, mem, ids, cfg.memdlm, mask_id=tok.mask_id, generator=generator,
        loss_backend=cfg.loss_backend,
    )  # fmt: skip
    with torch.no_grad(), mem.bind(phi):
        out = dd.generate_block_aligned(
            model, ids, mask_id=tok.mask_id, gen_length=6, block_length=4, generator=generator
        )
    mem.remove()
    assert printed == tok.decode(out[0, ids.shape[1] :].tolist())


def test_api_generate_takes_another_sampler():
    torch.manual_seed(0)
    model = dd.Transformer(50, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32).eval()
    prompt = torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(mask_id=49, gen_length=6, block_length=4, threshold=0.3)
    got = api.generate(model, prompt, adapt=False, sampler=dd.generate_block_aligned, **kwargs)
    with torch.no_grad():
        assert torch.equal(got, dd.generate_block_aligned(model, prompt, **kwargs))
    with pytest.raises(ValueError, match="steps"):
        api.generate(model, prompt, mask_id=49, gen_length=4, adapt=False)
    with pytest.raises(ValueError, match="steps"):
        api.generate(model, prompt, steps=4, adapt=False, sampler=dd.generate_block_aligned,
                     **kwargs)  # fmt: skip


def test_llada21_argument_checks():
    good = dict(gen_length=8, steps=None, block_length=None, temperature=0.0, threshold=None)
    good.update(cache="none", cache_refresh=None, cfg_scale=0.0, remasking="low_confidence")
    good.update(sampler="llada21", minimal_topk=1)
    check_sample_args(SimpleNamespace(**{**good, "block_length": 3}))  # need not divide 8
    for change, message in [
        (dict(minimal_topk=0), "--minimal-topk"),
        (dict(minimal_topk=9), "--minimal-topk"),
        (dict(cache="dual"), "--cache is an option of --sampler diffusion"),
        (dict(cfg_scale=0.5), "--cfg-scale"),
        (dict(remasking="random"), "--remasking"),
        (dict(steps=0), "--steps"),
        (dict(block_length=0), "--block-length"),
    ]:
        with pytest.raises(UsageError, match=message):
            check_sample_args(SimpleNamespace(**{**good, **change}))
