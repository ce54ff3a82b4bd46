"""A CLIP BPE tokenizer for the toy world, built offline from the captions' words.

CLIP's tokenizer is byte-level BPE with CLIP's conventions: text lowercased, an ``</w>`` suffix on the
last symbol of each word, ``<|startoftext|>`` / ``<|endoftext|>`` around the tokens, padding with
``<|endoftext|>``. No vocabulary file can be downloaded here, so we train the merges with the
``tokenizers`` library on the toy captions until every caption word is one token (the world has a few
dozen words, so this takes a few dozen merges), and lay the vocabulary out as CLIP's is: the 256 byte
symbols, the same with ``</w>``, one entry per merge in merge order, then the two special tokens.

``transformers.CLIPTokenizer(vocab=..., merges=...)`` builds it in memory and ``save_pretrained``
writes a folder that ``CLIPTokenizer.from_pretrained`` loads. (``CLIPTokenizer(vocab_file=...)`` would
silently ignore the files: check ``len(tokenizer)``.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 24  # the longest toy caption is 15 tokens with BOS/EOS; short sequences keep caches small


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def words(texts: Iterable[str]) -> list[str]:
    """The distinct lowercase words (runs of letters) of some texts, sorted."""
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})


def train_merges(vocabulary: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) that turn each word of ``vocabulary`` into a single token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    word_list = sorted(set(vocabulary))
    for w in word_list:
        if not re.fullmatch(r"[a-z]+", w):
            raise ValueError(f"toy words must be lowercase ASCII letters, got {w!r}")
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Enough room for every merge: a word of n letters needs at most n - 1.
    room = 600 + sum(len(w) for w in word_list)
    trainer = trainers.BpeTrainer(vocab_size=room, min_frequency=0, show_progress=False,
                                  initial_alphabet=sorted(set("".join(word_list))), end_of_word_suffix="</w>")
    bpe.train_from_iterator(word_list, trainer=trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def build(vocabulary: Iterable[str], max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary makes every word of ``vocabulary`` one token (checked)."""
    word_list = sorted(set(vocabulary))
    merges = train_merges(word_list)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[(a, b) for a, b in merges], model_max_length=max_length)
    check(tokenizer, word_list, len(vocab))
    return tokenizer


def check(tokenizer: CLIPTokenizer, vocabulary: Iterable[str], vocab_size: int | None = None) -> None:
    """Raise unless the tokenizer has its full vocabulary and maps each word to exactly one token."""
    if vocab_size is not None and len(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, expected {vocab_size} (vocabulary not loaded?)")
    unk = tokenizer.unk_token_id
    for w in vocabulary:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] == unk:
            raise ValueError(f"word {w!r} tokenizes to {tokenizer.convert_ids_to_tokens(ids)}, expected one token")


def save(tokenizer: CLIPTokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    return folder
