"""CLIP's BPE tokenizer, built offline from the vocabulary file shipped beside the configs.

Stable Diffusion's text encoders all use OpenAI CLIP's byte-level BPE: SD1.5 and SDXL's first
encoder as published in ``openai/clip-vit-large-patch14`` (padding with ``<|endoftext|>``), SD2 and
SDXL's second encoder as in OpenCLIP (padding with ``!``). diffusers' ``from_single_file`` would
download those tokenizer files; we ship the one file both come from, OpenAI's
``bpe_simple_vocab_16e6.txt.gz`` (MIT licence, as distributed with OpenCLIP), and build the 49,408-entry
vocabulary from it the way CLIP's ``SimpleTokenizer`` does: the 256 byte symbols, the same with the
end-of-word mark ``</w>``, the first 48,894 merges, then the two special tokens.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).parent / "configs" / "clip_bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
NUM_MERGES = VOCAB_SIZE - 256 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable characters (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges in priority order), as ``openai/clip-vit-large-patch14``'s vocab.json / merges.txt."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:NUM_MERGES + 1])
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise ValueError(f"{BPE_FILE.name}: expected {VOCAB_SIZE} distinct tokens, built {len(set(tokens))}; the file is damaged")
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` equal to the published SD tokenizers (``pad_token='!'`` for SD2 / SDXL's second)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                         pad_token=pad_token)
