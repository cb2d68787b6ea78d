"""The KV cache and classifier-free guidance through the recipe: `recipes.memdlm.generate`,
`python -m recipes.memdlm sample` and the lm-eval model's args, with adapted fast weights bound
in the cached and in the fresh calls alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffusion as dd
import recipes.memdlm as memdlm
from recipes.memdlm import api, method
from recipes.memdlm.config import MemDLMConfig

MASK = 49
# Fast weights on both layers: layer 0's FFN then shapes the keys and values layer 1 caches.
CONFIG = {"rank": 4, "alpha": 8.0, "layer_fraction": 1.0, "inner_lr": 3.0}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model():
    torch.manual_seed(0)
    model = dd.Transformer(50, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64)
    return model.double().eval()


@pytest.fixture
def prompts():
    return torch.randint(0, 48, (3, 20), generator=torch.Generator().manual_seed(1))


def adapted(model, prompts, seed=7):
    cfg = MemDLMConfig(**CONFIG)
    generator = torch.Generator().manual_seed(seed)
    mem = method.make_fast_weights(model, cfg)
    phi = method.adapt_to_prompt(model, mem, prompts, cfg, mask_id=MASK, generator=generator)
    return mem, phi, generator


def test_fast_weights_act_in_the_cached_and_the_fresh_positions(model, prompts):
    """With a per-sample adapted state bound, the cached forward on a fresh cache equals the
    full forward; a cache built without the state differs (the memory acts on cached keys)."""
    mem, phi, _ = adapted(model, prompts)
    x = torch.cat([prompts, torch.full((3, 8), MASK)], dim=1)
    x[:, 22] = 5
    with torch.no_grad():
        _, plain_cache = model.forward_with_cache(x)
        with mem.bind(phi):
            full = model(x)
            logits, cache = model.forward_with_cache(x)
            window = model.forward_from_cache(x[:, 20:28], cache, start=20)
            stale = model.forward_from_cache(x[:, 20:28], plain_cache, start=20)
    mem.remove()
    assert torch.equal(logits, full)
    torch.testing.assert_close(window, full[:, 20:28], rtol=0, atol=1e-12)
    assert (stale - full[:, 20:28]).abs().max() > 1e-6


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_api_generate_with_cache_and_cfg_is_the_library_call_under_the_adapted_weights(
    model, prompts, cache
):
    sampler = dict(gen_length=8, steps=8, block_length=4, cache=cache, cfg_scale=0.5)
    out = memdlm.generate(
        model,
        prompts,
        mask_id=MASK,
        config=CONFIG,
        generator=torch.Generator().manual_seed(7),
        **sampler,
    )
    mem, phi, generator = adapted(model, prompts)
    # the 2B guided rows: the conditional rows, then the prompt-masked ones, same weights
    assert torch.equal(api.guided_state(phi, 0.5)["layers.1.mlp.up_proj.A"][3:], phi[
        "layers.1.mlp.up_proj.A"])  # fmt: skip
    with torch.no_grad(), mem.bind(api.guided_state(phi, 0.5)):
        expected = dd.generate(model, prompts, mask_id=MASK, generator=generator, **sampler)
        refreshed = dd.generate(
            model, prompts, mask_id=MASK, **{**sampler, "cache_refresh": 1}
        )  # fmt: skip
        uncached = dd.generate(
            model, prompts, mask_id=MASK, **{**sampler, "cache": None}
        )  # fmt: skip
    mem.remove()
    assert torch.equal(out, expected)
    assert torch.equal(refreshed, uncached)  # the cache machinery is exact when fresh


def test_api_generate_hands_the_cache_and_cfg_to_the_sampler(model, prompts, monkeypatch):
    seen = []
    original = dd.generate

    def spy(denoiser, prompt, **kwargs):
        seen.append((denoiser, kwargs))
        return original(denoiser, prompt, **kwargs)

    monkeypatch.setattr(api.dd, "generate", spy)
    memdlm.generate(
        model, prompts, mask_id=MASK, gen_length=8, steps=8, block_length=4, adapt=False,
        cache="dual", cache_refresh=2, cfg_scale=0.5,
    )  # fmt: skip
    denoiser, kwargs = seen[0]
    assert denoiser is model
    assert (kwargs["cache"], kwargs["cache_refresh"], kwargs["cfg_scale"]) == ("dual", 2, 0.5)


def test_guided_state_and_cache_errors(model, prompts):
    assert api.guided_state(None, 1.0) is None
    state = {"a": torch.zeros(2, 3)}
    assert api.guided_state(state, 0.0) is state
    assert api.guided_state(state, 1.0)["a"].shape == (4, 3)

    def plain(x, attention_mask=None):
        return model(x)

    with pytest.raises(TypeError, match="forward_with_cache"):
        memdlm.generate(plain, prompts, mask_id=MASK, gen_length=4, steps=4, adapt=False,
                        cache="dual")  # fmt: skip


# --------------------------------------------------------------------------- CLI and lm-eval


def sample_cli(run_dir, *args):
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "recipes.memdlm", "sample", str(run_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_the_sample_command_takes_the_cache_and_cfg(run_dir):
    from recipes.memdlm.eval.harness_setup import load_run

    prompt = "amber code is 1234. "
    done = sample_cli(
        run_dir, "--prompt", prompt, "--gen-length", "8", "--block-length", "4", "--adapt",
        "--cache", "dual", "--cfg-scale", "0.5", "--seed", "3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The same computation in process: the command's adaptation, then the cached guided sampler.
    loaded = load_run(run_dir, device="cpu")
    cfg, tok, model = loaded.config, loaded.tokenizer, loaded.model
    ids = torch.tensor([tok.encode(prompt)])
    generator = torch.Generator().manual_seed(3)
    mem = method.make_fast_weights(model, cfg.memdlm)
    phi = method.adapt_to_prompt(
        model, mem, ids, cfg.memdlm, mask_id=tok.mask_id, generator=generator,
        loss_backend=cfg.loss_backend,
    )  # fmt: skip
    with torch.no_grad(), mem.bind(api.guided_state(phi, 0.5)):
        out = dd.generate(
            model, ids, mask_id=tok.mask_id, gen_length=8, steps=8, block_length=4,
            generator=generator, cache="dual", cfg_scale=0.5,
            **{**cfg.generate_options(), "compiler": None},
        )  # fmt: skip
    mem.remove()
    assert done.stdout.rstrip("\n") == tok.decode(out[0, ids.shape[1] :].tolist())


def test_the_sample_commands_bad_cache_and_cfg_values_are_usage_errors():
    from types import SimpleNamespace

    from recipes.memdlm.commands.folders import UsageError
    from recipes.memdlm.commands.sample import check_sample_args

    good = dict(gen_length=8, steps=None, block_length=None, temperature=0.0, threshold=None)
    good.update(cache="none", cache_refresh=None, cfg_scale=0.0)
    check_sample_args(SimpleNamespace(**good))
    for change, message in [
        (dict(cache_refresh=2), "--cache-refresh needs --cache"),
        (dict(cache="dual", cache_refresh=0), "--cache-refresh must be at least 1"),
        (dict(cfg_scale=-0.5), "--cfg-scale must be"),
    ]:
        with pytest.raises(UsageError, match=message):
            check_sample_args(SimpleNamespace(**{**good, **change}))


def test_lm_eval_model_args_reach_the_sampler(run_dir):
    pytest.importorskip("lm_eval")
    from recipes.memdlm.eval import harness_setup
    from recipes.memdlm.eval.harness import MemDLMLM, load_run

    options, _ = harness_setup.parse_model_args({"run": "x", "cache": "none"})
    assert options.cache is None and options.cfg_scale == 0.0
    options, _ = harness_setup.parse_model_args(
        {"run": "x", "cache": "dual", "cache_refresh": "2", "cfg_scale": "0.5"}
    )
    assert (options.cache, options.cache_refresh, options.cfg_scale) == ("dual", 2, 0.5)
    for args, named in [
        ({"cache": "full"}, "cache="),
        ({"cache_refresh": "2"}, "cache_refresh"),
        ({"cfg_scale": "-1"}, "cfg_scale"),
    ]:
        with pytest.raises(ValueError, match=named):
            harness_setup.parse_model_args({"run": "x", **args})

    loaded = load_run(run_dir, device="cpu")
    lm = MemDLMLM.from_loaded(loaded, adapt=True, inner_lr=5.0, cache="dual", cfg_scale=0.5)
    ids = list(b"amber code is 1234. ")
    text = lm.sample([ids, ids[::-1]], 8, 0.0)
    # The same as the API with the rows' adapted states bound (guided: repeated for 2B rows).
    states = [lm.adapted_state(i) for i in (ids, ids[::-1])]
    batched = api.guided_state({k: torch.cat([s[k] for s in states]) for k in states[0]}, 0.5)
    gen_length, steps, block = lm.sampler_lengths(8)
    flat = [t for row in (ids, ids[::-1]) for t in [*row, -1]]
    with torch.no_grad(), lm.fast_weights.bind(batched):
        out = api.generate(
            lm.model, torch.tensor([ids, ids[::-1]]), mask_id=lm.mask_id, gen_length=gen_length,
            steps=steps, block_length=block, adapt=False, generator=lm._generator(flat, "sample"),
            cache="dual", cfg_scale=0.5,
        )  # fmt: skip
    assert text == [lm.tokenizer.decode(row[len(ids) : len(ids) + 8].tolist()) for row in out]


def test_lm_eval_model_samples_with_the_llada21_sampler(run_dir):
    """sampler=llada21: the authors' LLaDA2.1 evaluation sampler (api.llada21_sampling), the
    same tokens as the API call; its canvas is padded to whole blocks."""
    pytest.importorskip("lm_eval")
    from recipes.memdlm.eval import harness_setup
    from recipes.memdlm.eval.harness import MemDLMLM, load_run

    for args, named in [({"sampler": "other"}, "sampler="), ({"minimal_topk": "0"}, "minimal")]:
        with pytest.raises(ValueError, match=named):
            harness_setup.parse_model_args({"run": "x", **args})
    with pytest.raises(ValueError, match="belong to sampler=diffusion"):
        harness_setup.parse_model_args({"run": "x", "sampler": "llada21", "cfg_scale": "1"})
    loaded = load_run(run_dir, device="cpu")
    lm = MemDLMLM.from_loaded(loaded, sampler="llada21", block_length=4, threshold=0.5)
    ids = list(b"amber code is 1234. ")
    text = lm.sample([ids, ids[::-1]], 6, 0.0)
    flat = [t for row in (ids, ids[::-1]) for t in [*row, -1]]
    out = api.generate(
        lm.model, torch.tensor([ids, ids[::-1]]), mask_id=lm.mask_id, gen_length=6, adapt=False,
        generator=lm._generator(flat, "sample"),
        **api.llada21_sampling(lm.model, block_length=4, threshold=0.5),
    )  # fmt: skip
    assert out.shape[1] == 28  # 20 + 6 = 26 positions padded to whole blocks of 4
    assert text == [lm.tokenizer.decode(row[len(ids) : len(ids) + 6].tolist()) for row in out]
    assert lm.sampler_lengths(6)[0] == 9  # room for the answer and the padding


def test_the_guided_likelihood_is_the_elbo_of_llada_cfg_logits(model):
    """api.log_likelihood(cfg_scale=w) = the ELBO estimator run on un + (w+1)(cond - un)."""
    prompt = torch.randint(0, 48, (6,), generator=torch.Generator().manual_seed(2))
    responses = torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(3))
    w = 0.5

    def guided(x):
        un = x.clone()
        un[:, :6] = MASK
        return model(un) + (w + 1) * (model(x) - model(un))

    with torch.no_grad():
        got = api.log_likelihood(
            model, prompt, responses, mask_id=MASK, mc_num=8, mc_batch=4, cfg_scale=w,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        want = dd.elbo_log_likelihood(
            guided, prompt.expand(2, -1), responses, mask_id=MASK, mc_num=8, batch_size=4,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
        plain = api.log_likelihood(
            model, prompt, responses, mask_id=MASK, mc_num=8, mc_batch=4,
            generator=torch.Generator().manual_seed(5),
        )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert (got - plain).abs().max() > 1e-6
    with pytest.raises(ValueError, match="cfg_scale"):
        api.log_likelihood(model, prompt, responses, mask_id=MASK, cfg_scale=-1.0)


def test_the_lm_eval_models_likelihood_takes_cfg_scale(run_dir):
    pytest.importorskip("lm_eval")
    from recipes.memdlm.eval.harness import MemDLMLM, load_run, request_seed

    loaded = load_run(run_dir, device="cpu")
    lm = MemDLMLM.from_loaded(loaded, cfg_scale=0.5, mc_num=4, mc_batch=4)
    context, continuation = list(b"amber code is "), list(b"1234")
    ((value, _),) = lm.score(context, [continuation])
    generator = torch.Generator().manual_seed(request_seed(0, context, "elbo"))
    want = api.log_likelihood(
        lm.model, torch.tensor(context), torch.tensor([continuation]), mask_id=lm.mask_id,
        mc_num=4, mc_batch=4, generator=generator, cfg_scale=0.5,
    )  # fmt: skip
    assert value == pytest.approx(float(want[0]), abs=1e-9)
