"""Stand-in for Dream's `tokenization_dream.py`: a slow byte-level BPE tokenizer over
`vocab.json` + `merges.txt` whose special tokens are added tokens after the vocabulary
(eos = pad = unk = `<|endoftext|>`, no BOS). Quirk kept: an id past the tokenizer (the real
embedding has 152064 rows for 151665 + specials tokens) converts to None, and decoding it
raises TypeError inside `convert_tokens_to_string`. Our own code, same behaviour."""

from transformers import GPT2Tokenizer


class DreamTokenizer(GPT2Tokenizer):
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, merges_file, **kwargs):
        for name in ("unk_token", "eos_token", "pad_token"):
            kwargs.setdefault(name, "<|endoftext|>")
        kwargs.setdefault("bos_token", None)
        super().__init__(vocab_file, merges_file, **kwargs)

    def _convert_id_to_token(self, index):
        return self.decoder.get(index)  # None past the vocabulary, as the original

    def decode(self, token_ids, skip_special_tokens=False, **kwargs):
        kwargs.setdefault("spaces_between_special_tokens", False)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)
