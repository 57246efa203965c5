"""Character-level Hugging Face tokenizer for the CPU demo model: Qwen2's byte-level BPE with no merges.

Why: the demo model is tiny and trained from scratch; one token per character makes every digit its own token,
so the arithmetic is learnable in a couple of minutes. It has to be Qwen2's own tokenizer pipeline (byte-level
BPE, Qwen2 pre-tokenizer regex, NFC): transformers' AutoTokenizer loads any directory whose config.json says
model_type qwen2 as `Qwen2Tokenizer` and rebuilds that pipeline whatever tokenizer.json says, so a WordLevel
tokenizer would silently lose its spaces next to our Qwen2 model. With a vocabulary of the 256 byte symbols and
no merges, every byte is one token, any UTF-8 text (in NFC) round-trips exactly, and the rollout engine, the
reward and the Megatron bridge see an ordinary Qwen2 model directory.

How: ``tokenizer = build_char_tokenizer(); tokenizer.save_pretrained(model_dir)``; later
``AutoTokenizer.from_pretrained(model_dir)`` loads it offline. ASCII characters are single tokens, so
``len(tokenizer(text).input_ids) == len(text)`` for ASCII text without special tokens.
"""

from __future__ import annotations

from megatron_zero.demo.corpus import END_OF_TEXT


def build_char_tokenizer():
    """A `Qwen2Tokenizer`: id 0 is END_OF_TEXT (eos and pad), ids 1-256 the byte-level symbols."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    # Byte-level symbols sorted by code point: printable ASCII (its own symbol) comes first.
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([END_OF_TEXT, *symbols])}
    return Qwen2Tokenizer(vocab=vocab, merges=[], eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                          unk_token=END_OF_TEXT, clean_up_tokenization_spaces=False, model_max_length=128)
