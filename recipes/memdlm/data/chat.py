"""Examples through the tokenizer's chat template, as the MemDLM authors' pipeline encodes them.

The authors (JarvisPei/MemDLM `examples/llada/sft.py`) map each record with dllm's
`default_sft_map_fn`: the token ids are the template over the whole conversation, the
response as the assistant's last turn, without a generation prompt; the prompt length is the
number of ids of the template over the turns before the response *with* the generation prompt,
and those first ids are never scored (labels -100). No EOS is appended: the template's own
end-of-turn token ends the response. `apply_chat_template` tokenizes the rendered text without
adding special tokens again (a BOS the template writes is its own).
"""

from __future__ import annotations

from recipes.memdlm.data.tasks import DataError, Example


def require_template(tok) -> None:
    """`model.chat_template` needs a Hugging Face tokenizer that has a chat template."""
    inner = getattr(tok, "tokenizer", None)
    if inner is None:
        raise DataError(
            "model.chat_template needs a Hugging Face model (model.path) whose tokenizer has a "
            "chat template; the byte tokenizer has none"
        )
    if not getattr(inner, "chat_template", None):
        raise DataError(
            f"model.chat_template is true but the tokenizer of {inner.name_or_path!r} has no "
            "chat template; set model.chat_template false"
        )


def _apply(tok, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    ids = tok.tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
    )
    return [int(i) for i in ids]


def template_ids(tok, example: Example) -> tuple[list[int], int]:
    """(input_ids, prompt_length) of one example: `input_ids[:prompt_length]` is never scored.

    input_ids = template(turns + [assistant: response]), no generation prompt;
    prompt_length = len(template(turns, generation prompt)), turns = `example.conversation()`.
    """
    turns = example.conversation()
    whole = [*turns, {"role": "assistant", "content": example.response}]
    ids = _apply(tok, whole, generation_prompt=False)
    return ids, len(_apply(tok, turns, generation_prompt=True))


def prompt_text(tok, example: Example) -> str:
    """The turns before the response rendered by the template, ready for the answer (what a
    sampler is given)."""
    return tok.tokenizer.apply_chat_template(
        example.conversation(), tokenize=False, add_generation_prompt=True
    )
