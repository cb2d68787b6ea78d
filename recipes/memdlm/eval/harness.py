"""The lm-evaluation-harness model `memdlm`: a run of this recipe (or a Hugging Face masked
diffusion model) evaluated with lm-eval's own tasks, with optional inference-time adaptation.

    python -m recipes.memdlm harness --model memdlm --model_args run=runs/RUN,adapt=true \\
        --tasks my_task --include_path my_tasks/ --output_path results/

or, from Python, `lm_eval.simple_evaluate(model=MemDLMLM(run=...), tasks=[...])`. docs/evaluation.md
lists every model arg. The three request types:

- `generate_until`: the recipe's sampler (`api.generate`; greedy, low-confidence remasking,
  steps = block length = max_gen_toks unless set), rows batched when they share a prompt length
  and generation settings; decoded up to EOS, then cut at the first stop string.
- `loglikelihood`: the stratified Monte Carlo ELBO (`api.log_likelihood`, unbiased), after
  adapting to the context once per distinct context (all choices of a multiple-choice item
  share it, and the same masks: common random numbers). `is_greedy`: with the context given
  and the whole continuation masked, one forward pass's argmax at every continuation position
  equals the continuation (greedy one-step unmasking reproduces it).
- `loglikelihood_rolling`: the ELBO of the whole text with an empty context (never adapted:
  there is no context to adapt to); texts longer than max_length are scored in chunks of
  max_length // 2 tokens, each conditioned on the tokens before it that fit.

Random numbers (adaptation masks, LoRA init, ELBO masks, sampler noise) come from a generator
seeded by `seed` and the request's own tokens, so a result does not depend on request order or
batching (a stochastic sampler, temperature > 0 or remasking=random, runs one request at a time
for that reason), nor on the process that runs it: under `torchrun`/`accelerate launch` each of
N processes evaluates its share of the requests and rank 0 writes one process's scores
(`eval/ranks.py`).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in models first: registering earlier hides them)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from recipes.memdlm import api
from recipes.memdlm.eval import ranks
from recipes.memdlm.eval.harness_setup import (
    GenSettings,
    LoadedRun,
    cut_at_stops,
    default_max_length,
    encode_pair,
    gen_settings,
    greedy_matches,
    load_run,
    request_seed,
    rolling_windows,
)
from recipes.memdlm.eval.model_args import Options, inner_config, parse_model_args

# lm-eval's logger tree: its handler and --verbosity apply (lm_eval.utils.setup_logging)
log = logging.getLogger("lm_eval.models.memdlm")


# --------------------------------------------------------------------------- the model


@register_model("memdlm")
class MemDLMLM(LM):
    """lm-eval model over a run of this recipe or a Hugging Face folder (module doc).

    Construct with the model args as keywords (`MemDLMLM(run="runs/x", adapt=True)`), or wrap a
    model already loaded with `MemDLMLM.from_loaded(load_run(...), **model_args)`.
    """

    def __init__(self, **model_args: Any) -> None:
        options, overrides = parse_model_args(model_args)
        loaded = load_run(
            options.run,
            pretrained=options.pretrained,
            peft=options.peft,
            trust_remote_code=options.trust_remote_code,
            dtype=options.dtype,
            load_in_4bit=options.load_in_4bit,
            mask_token=options.mask_token,
            eos_token=options.eos_token,
            device=ranks.process_device(options.device),
        )
        self._setup(loaded, options, overrides)

    @classmethod
    def from_loaded(cls, loaded: LoadedRun, **model_args: Any) -> MemDLMLM:
        """The model over `loaded`; run=/pretrained= are not given (it is already loaded)."""
        loading = ("run", "pretrained", "peft", "trust_remote_code", "dtype", "load_in_4bit")
        for name in (*loading, "device"):
            if name in model_args:
                raise ValueError(f"from_loaded: {name} does not apply to a loaded model")
        options, overrides = parse_model_args({**model_args, "run": "<loaded>"})
        self = cls.__new__(cls)
        self._setup(loaded, options, overrides)
        return self

    def _setup(self, loaded: LoadedRun, options: Options, overrides: Mapping[str, Any]) -> None:
        super().__init__()
        self.loaded, self.options = loaded, options
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self._device = loaded.device
        self.ranks = ranks.join(loaded.device)  # lm-eval splits the requests by these
        self._rank, self._world_size = self.ranks.rank, self.ranks.world_size
        if self.ranks.world_size > 1:
            log.info("memdlm: rank %d of %d on %s", self.rank, self.world_size, self._device)
        self.mask_id = int(loaded.tokenizer.mask_id)
        self.max_length = options.max_length or default_max_length(loaded)
        self.inner = inner_config(loaded.config.memdlm, overrides)
        self.fast_weights = api.fast_weights_for(self.model, self.inner) if options.adapt else None
        self.adaptations = 0  # inner loops run (one per distinct context while cached)
        self._cache: collections.OrderedDict = collections.OrderedDict()

    # ----------------------------------------------------------------- processes
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.ranks.all_gather(tensor)

    def gather_object(self, obj, dst: int = 0):
        return self.ranks.gather_object(obj, dst)

    def barrier(self) -> None:
        self.ranks.barrier()

    def _report_share(self, requests, kind: str) -> None:
        """One line per rank: how many requests of `kind` it runs (lm-eval's padding included)."""
        if self.world_size > 1:
            share = (self.rank, self.world_size, len(requests), kind)
            log.info("memdlm rank %d of %d: %d %s requests", *share)

    # ----------------------------------------------------------------- adaptation
    def adapted_state(self, context_ids: Sequence[int]) -> dict[str, torch.Tensor] | None:
        """The fast weights adapted to this context (leading dim 1), cached by its tokens; None
        without adaptation or for an empty context."""
        if self.fast_weights is None or not context_ids:
            return None
        key = tuple(context_ids)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        generator = self._generator(key, "adapt")
        prompt = torch.tensor([key], device=self._device)
        state = api.adapt_prompt(
            self.model,
            prompt,
            mask_id=self.mask_id,
            fast_weights=self.fast_weights,
            config=self.inner,
            generator=generator,
        )
        self.adaptations += 1
        self._cache[key] = state
        if len(self._cache) > self.options.adapt_cache:
            self._cache.popitem(last=False)
        return state

    def _generator(self, tokens: Sequence[int], purpose: str) -> torch.Generator:
        seed = request_seed(self.options.seed, tokens, purpose)
        return torch.Generator(device=self._device).manual_seed(seed)

    # ----------------------------------------------------------------- likelihood
    def score(self, context_ids: Sequence[int], continuations: Sequence[Sequence[int]]):
        """[(ELBO, is_greedy)] of each continuation after one context (adapted once); every
        continuation is estimated with the same random numbers."""
        state = self.adapted_state(context_ids)
        mem = self.fast_weights if state is not None else None
        prompt = torch.tensor(list(context_ids), dtype=torch.long, device=self._device)
        out = []
        for continuation in continuations:
            if not continuation:
                out.append((0.0, True))
                continue
            response = torch.tensor([list(continuation)], device=self._device)
            value = api.log_likelihood(
                self.model,
                prompt,
                response,
                mask_id=self.mask_id,
                state=state,
                fast_weights=mem,
                mc_num=self.options.mc_num,
                mc_batch=self.options.mc_batch,
                generator=self._generator(context_ids, "elbo"),
                cfg_scale=self.options.cfg_scale,
            )
            greedy = greedy_matches(
                self.model, prompt, response, mask_id=self.mask_id, state=state, fast_weights=mem
            )
            out.append((float(value[0]), bool(greedy[0])))
        return out

    def _fit(self, context_ids: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that context + continuation fit in max_length."""
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}"
            )
        room = self.max_length - len(continuation)
        return context_ids[len(context_ids) - room :] if len(context_ids) > room else context_ids

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(ELBO of the continuation, is_greedy) per (context, continuation) request; requests
        are grouped by context so each context is adapted once."""
        self._report_share(requests, "loglikelihood")
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, request in enumerate(requests):
            context, continuation = request.args
            context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
            key = tuple(self._fit(context_ids, continuation_ids))
            groups.setdefault(key, []).append((index, continuation_ids))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for context_ids, members in groups.items():
            scores = self.score(context_ids, [c for _, c in members])
            for (index, _), result in zip(members, scores):
                results[index] = result
                self.cache_hook.add_partial("loglikelihood", requests[index].args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """ELBO of each whole text with an empty context (chunked beyond max_length)."""
        self._report_share(requests, "loglikelihood_rolling")
        results = []
        for request in requests:
            (text,) = request.args
            total = 0.0
            for prompt, chunk in rolling_windows(self.tokenizer.encode(text), self.max_length):
                total += self._plain_elbo(prompt, chunk)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return results

    def _plain_elbo(self, prompt: list[int], chunk: list[int]) -> float:
        value = api.log_likelihood(
            self.model,
            torch.tensor(prompt, dtype=torch.long, device=self._device),
            torch.tensor([chunk], device=self._device),
            mask_id=self.mask_id,
            mc_num=self.options.mc_num,
            mc_batch=self.options.mc_batch,
            generator=self._generator(prompt + [-1] + chunk, "rolling"),
        )
        return float(value[0])

    # ----------------------------------------------------------------- generation
    def sampler_lengths(self, max_gen_toks: int) -> tuple[int, int, int]:
        """(positions the answer may take, steps, block_length). `diffusion.generate`:
        max_gen_toks rounded up to whole blocks; by default one block and one token per step
        (the authors' setting). sampler=llada21: its canvas is padded to whole blocks counted
        from position 0, so the answer may take up to a block more."""
        if self.options.sampler == "llada21":
            block = self.options.block_length or api.LLADA21["block_length"]
            return max_gen_toks + block - 1, self.options.steps, block
        block = self.options.block_length or max_gen_toks
        gen_length = -(-max_gen_toks // block) * block
        return gen_length, self.options.steps or gen_length, block

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Sampled text per (context, gen_kwargs) request, cut at its stop strings."""
        self._report_share(requests, "generate_until")
        jobs: dict[tuple, list[tuple[int, list[int], GenSettings]]] = {}
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            settings = gen_settings(gen_kwargs, self.options.max_gen_toks)
            gen_length = self.sampler_lengths(settings.max_gen_toks)[0]
            room = self.max_length - gen_length
            if room < 0:
                raise ValueError(
                    f"max_gen_toks={settings.max_gen_toks} exceeds max_length={self.max_length}"
                )
            ids = self.tokenizer.encode(context)
            ids = ids[len(ids) - room :] if len(ids) > room else ids
            key = (len(ids), settings.max_gen_toks, settings.temperature)
            jobs.setdefault(key, []).append((index, ids, settings))
        results: list[str | None] = [None] * len(requests)
        for (_, max_gen_toks, temperature), members in jobs.items():
            size = self.options.batch_size
            if temperature > 0 or self.options.remasking == "random":
                size = 1  # the noise is drawn per sampler call: one request's own seed
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                rows = self.sample([ids for _, ids, _ in chunk], max_gen_toks, temperature)
                for (index, _, settings), text in zip(chunk, rows):
                    results[index] = cut_at_stops(text, settings.until)
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results

    def llada21_options(self, max_gen_toks: int, temperature: float) -> dict | None:
        """`api.generate`'s arguments for sampler=llada21 (None for sampler=diffusion)."""
        if self.options.sampler != "llada21":
            return None
        return dict(
            mask_id=self.mask_id,
            gen_length=max_gen_toks,
            adapt=False,
            **api.llada21_sampling(
                self.model,
                block_length=self.options.block_length,
                steps_per_block=self.options.steps,
                threshold=self.options.threshold,
                minimal_topk=self.options.minimal_topk,
                temperature=temperature,
            ),
        )

    def sample(self, prompts: list[list[int]], max_gen_toks: int, temperature: float) -> list[str]:
        """Decoded generations (up to EOS, before stop strings) for prompts of one length, each
        with its own adapted fast weights when adapting."""
        gen_length, steps, block = self.sampler_lengths(max_gen_toks)
        prompt = torch.tensor(prompts, dtype=torch.long, device=self._device)
        prompt = prompt.reshape(len(prompts), len(prompts[0]))
        states = [self.adapted_state(ids) for ids in prompts]
        flat = [t for ids in prompts for t in [*ids, -1]]
        options = self.llada21_options(max_gen_toks, temperature) or dict(
            mask_id=self.mask_id,
            gen_length=gen_length,
            steps=steps,
            adapt=False,
            block_length=block,
            remasking=self.options.remasking,
            temperature=temperature,
            threshold=self.options.threshold,
            cfg_scale=self.options.cfg_scale,
            sample_attention=self.loaded.config.model.sample_attention,
            sample_block_size=self.loaded.config.model.sample_block_size,
            **self.loaded.config.generate_options(),
        )
        options["generator"] = self._generator(flat, "sample")
        if self.options.cache is not None:  # the cached calls run eagerly
            options.update(
                cache=self.options.cache, cache_refresh=self.options.cache_refresh, compiler=None
            )
        if states[0] is None:
            out = api.generate(self.model, prompt, **options)
        else:
            batched = {k: torch.cat([s[k] for s in states]) for k in states[0]}
            batched = api.guided_state(batched, self.options.cfg_scale)
            with torch.no_grad(), self.fast_weights.bind(batched):
                out = api.generate(self.model, prompt, **options)
        generated = out[:, prompt.shape[1] : prompt.shape[1] + max_gen_toks].tolist()
        return [self.tokenizer.decode(row) for row in generated]


# --------------------------------------------------------------------------- command line


def option_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv (the last one), else None."""
    value = None
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(name + "="):
            value = token[len(name) + 1 :]
    return value


def check_cli_model_args(argv: Sequence[str]) -> None:
    """With --model memdlm, check --model_args (key=value,... or a JSON object, as lm-eval
    reads them) before lm-eval indexes its tasks, so a bad arg fails in seconds."""
    import json

    from lm_eval.utils import simple_parse_args_string

    if option_value(argv, "--model") != "memdlm":
        return
    text = option_value(argv, "--model_args") or ""
    args = json.loads(text) if text.strip().startswith("{") else simple_parse_args_string(text)
    parse_model_args(args)


def main(argv: list[str] | None = None) -> int:
    """`python -m recipes.memdlm harness ARGS`: lm-eval's own command line (ARGS exactly as for
    `lm-eval`), with the `memdlm` model registered. User errors (ValueError) print one line and
    return 2 (MEMDLM_DEBUG=1 shows the traceback)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        check_cli_model_args(argv)
        cli_evaluate()
    except ValueError as error:
        if os.environ.get("MEMDLM_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
        ranks.leave()  # the process group the model joined under torchrun / accelerate
    return 0
