"""Fixtures of the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.recipes.data.chat_tokenizer import write_chat_tokenizer


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """A real Hugging Face tokenizer with a chat template (chat_tokenizer.py)."""
    return write_chat_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"))
