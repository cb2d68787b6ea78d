"""A real Hugging Face tokenizer with a chat template, built here (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

SPECIALS = (
    "<|endoftext|>",
    "<|startoftext|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|mdm_mask|>",
)
# In the style of LLaDA-8B-Instruct's template: BOS once, a header per turn, the content trimmed,
# an end-of-turn token; the generation prompt is the assistant header.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def write_chat_tokenizer(folder: Path) -> Path:
    """A byte-level BPE `PreTrainedTokenizerFast` with LLaDA's special tokens and TEMPLATE,
    saved into `folder`."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from recipes.memdlm.data.tasks import filler_text

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIALS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    text = filler_text("train")[:20000]
    tok.train_from_iterator([text[i : i + 500] for i in range(0, len(text), 500)], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        chat_template=TEMPLATE,
    )
    fast.save_pretrained(folder)
    return folder
