"""Text prompts encoded as AUTOMATIC1111 encodes them, for diffusers' SD / SD2 / SDXL pipelines.

A prompt (its extra-network tags already taken out) becomes, for one step of the run:

1. runs of (text, weight) (:func:`imprompt.generation.prompt_syntax.parse_emphasis`);
2. 77-token chunks: start + 75 tokens + end, padded (``build_chunks``; ``BREAK`` and prompts longer than
   75 tokens make more chunks; the toy model's shorter context makes shorter ones); textual-inversion
   names become their vectors;
3. each chunk through the text encoder(s) as diffusers' pipeline would run it (SD / SD2: the last
   hidden state; SDXL: the penultimate hidden states of CLIP-L and OpenCLIP-bigG side by side, and the
   pooled projection of the first chunk), then A1111's "Original" emphasis: the hidden states multiplied
   by each token's weight, then rescaled so their mean is what it was (per chunk);
4. chunks concatenated along the token axis.

A prompt with no syntax and no more than 75 tokens gives exactly (``torch.equal``) the embeddings of
the pipeline's own ``encode_prompt``. Prompt and negative prompt are padded to the same length with
the empty prompt's chunk, as A1111 does; with SDXL's ``force_zeros_for_empty_prompt`` an empty
negative prompt is zeros, as diffusers does.

Textual-inversion vectors replace placeholder tokens through a forward hook on the encoder's token
embedding that lives only for one encoder call (nothing stays on the shared model).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from ..models.embeddings import read_embedding
from .prompt_syntax import build_chunks, extract_networks, parse_emphasis, prompt_schedule, text_at_step

PLACEHOLDER = 0  # the token id embedding vectors stand on (A1111's choice); replaced before the encoder sees it


@dataclass(frozen=True)
class Tower:
    """One tokenizer + text encoder of a pipeline, and how diffusers reads it."""

    tokenizer: object
    encoder: torch.nn.Module
    key: str  # "" (SD / SD2), "clip_l" or "clip_g" (SDXL): which vectors of an embedding file it takes
    penultimate: bool  # SDXL reads hidden_states[-2]
    pooled: bool  # the tower whose projected EOS state is SDXL's pooled embedding


def towers(pipe) -> list[Tower]:
    """The pipeline's text towers, or [] when it has none imprompt can encode for (then the pipeline's
    own prompt strings are used)."""
    first, second = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    if second is not None:  # SDXL
        if first is None:
            return []
        return [Tower(pipe.tokenizer, first, "clip_l", True, False), Tower(pipe.tokenizer_2, second, "clip_g", True, True)]
    if first is None or getattr(pipe, "tokenizer", None) is None:
        return []
    return [Tower(pipe.tokenizer, first, "", False, False)]


class EmbeddingLibrary:
    """Textual-inversion embeddings by name (the file name without its extension, as A1111 names them),
    read from disk on first use and kept. ``files``: name -> path; ``bases``: name -> "SD1.5" / "SD2" /
    "SDXL" where known, so that an embedding for another model is not offered (A1111 skips those)."""

    def __init__(self, files: Mapping[str, Path] | None = None, bases: Mapping[str, str | None] | None = None,
                 widths: Mapping[str, int | None] | None = None):
        self.files = dict(files or {})
        self.bases = dict(bases or {})
        self.widths = dict(widths or {})
        self._vectors: dict[str, dict[str, torch.Tensor]] = {}
        self._ids: dict[tuple[int, str], list[int]] = {}

    @classmethod
    def from_catalog(cls, catalog) -> "EmbeddingLibrary":
        entries = [e for e in catalog.of_kind("embedding") if e.usable] if catalog is not None else []
        return cls({e.stem: e.path for e in entries}, {e.stem: e.info.base for e in entries},
                   {e.stem: e.info.details.get("width") for e in entries})

    def vectors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._vectors:
            self._vectors[name] = read_embedding(self.files[name])
        return self._vectors[name]

    def names_for(self, base: str | None, width: int | None = None) -> list[str]:
        """The names a model of ``base`` (text encoder ``width`` wide) can use: those made for its base;
        those of no known base (another width: the toy world's) only where the width is the same."""
        def fits(name: str) -> bool:
            made_for = self.bases.get(name)
            if made_for is not None:
                return made_for == base
            return self.widths.get(name) in (None, width)
        return [n for n in self.files if fits(n)]

    def finder(self, tower: Tower, base: str | None):
        """``find(tokens, i) -> (name, tokens spanned, vectors) | None``, A1111's rule: the longest embedding
        name whose tokens start at position i."""
        candidates = []
        for name in self.names_for(base, tower.encoder.get_input_embeddings().weight.shape[1]):
            key = (id(tower.tokenizer), name)
            if key not in self._ids:
                self._ids[key] = tower.tokenizer.convert_tokens_to_ids(tower.tokenizer.tokenize(name))
            if self._ids[key]:
                candidates.append((self._ids[key], name))
        candidates.sort(key=lambda c: -len(c[0]))

        def find(tokens: list[int], i: int):
            for ids, name in candidates:
                if tokens[i:i + len(ids)] == ids:
                    return name, len(ids), self.vectors_of(name, tower).shape[0]
            return None
        return find

    def vectors_of(self, name: str, tower: Tower) -> torch.Tensor:
        vectors = self.vectors(name)
        key = tower.key if tower.key in vectors else ""
        if key not in vectors:
            raise ValueError(f"embedding {name!r} has vectors for {', '.join(vectors) or 'one encoder'}, not for {tower.key}")
        width = tower.encoder.get_input_embeddings().weight.shape[1]
        if vectors[key].shape[1] != width:
            raise ValueError(f"embedding {name!r} is {vectors[key].shape[1]} wide; this model's text encoder "
                             f"{tower.key or ''} is {width} wide (an embedding for another Stable Diffusion version)")
        return vectors[key]

    def hashes(self, names: Sequence[str]) -> dict[str, str]:
        """A1111's ``TI hashes``: the first 12 hex digits of each file's SHA-256."""
        from ..models.hashes import sha256_file

        return {n: sha256_file(self.files[n])[:12] for n in names}


def base_of(pipe) -> str | None:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "SDXL"
    encoder = getattr(pipe, "text_encoder", None)
    width = encoder.get_input_embeddings().weight.shape[1] if encoder is not None else None
    return {768: "SD1.5", 1024: "SD2"}.get(width)


@contextlib.contextmanager
def _vectors_at(encoder: torch.nn.Module, rows: dict[int, torch.Tensor]) -> Iterator[None]:
    """For one call: the token embedding's output at the given positions replaced by vectors."""
    if not rows:
        yield
        return

    def replace(module, inputs, output):
        output = output.clone()
        for position, vector in rows.items():
            output[:, position:position + vector.shape[0]] = vector.to(output)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@dataclass(frozen=True)
class Conditioning:
    """The text side of one step: hidden states [1, tokens, width] and SDXL's pooled [1, width] (or None)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None


MEAN_FLOOR = 0.01  # |mean| below this fraction of the spread: there is no mean to restore


def original_emphasis(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis: each token's hidden state times its weight, then the whole chunk
    rescaled so that its mean is unchanged (the weights change the mix, not the overall magnitude).

    CLIP's final layer norm has a learned bias, so real SD encoders' states have a clear mean. A text
    encoder whose states average to about zero (|mean| < 1% of their standard deviation: a layer norm
    without bias, as in the toy model and random test models) has no mean to restore; dividing by a
    near-zero mean would scale the chunk by noise, so there the weights apply alone."""
    weighted = hidden * weights.reshape(1, -1, 1).to(hidden)
    original_mean, spread = hidden.float().mean(), hidden.float().std()
    if original_mean.abs() < MEAN_FLOOR * spread:
        return weighted
    return weighted * (original_mean / weighted.float().mean()).to(hidden)


@dataclass
class PromptEncoder:
    """Encodes prompt texts for one pipeline; encodings are kept by text for the encoder's lifetime (one
    generation), so a schedule that returns to a text does not encode it twice."""

    pipe: object
    embeddings: EmbeddingLibrary | None = None
    used_embeddings: set[str] = field(default_factory=set)
    _cache: dict[str, Conditioning] = field(default_factory=dict)

    def __post_init__(self):
        self.towers = towers(self.pipe)
        self.base = base_of(self.pipe)
        # CLIP's "," token, read once (get_vocab builds a 49k-entry dict); None where there is none
        self._commas = {id(t.tokenizer): t.tokenizer.get_vocab().get(",</w>") for t in self.towers}

    @property
    def available(self) -> bool:
        return bool(self.towers)

    def chunks(self, text: str, tower: Tower):
        tokenizer = tower.tokenizer
        find = self.embeddings.finder(tower, self.base) if self.embeddings and self.embeddings.files else (
            lambda tokens, i: None)
        return build_chunks(
            parse_emphasis(text),
            lambda t: tokenizer.convert_tokens_to_ids(tokenizer.tokenize(t)),  # no specials, no length warning
            start=tokenizer.bos_token_id, end=tokenizer.eos_token_id, comma=self._commas[id(tokenizer)],
            find_embedding=find, placeholder=PLACEHOLDER, chunk_tokens=tokenizer.model_max_length - 2)

    def _encode_tower(self, text: str, tower: Tower) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = next(tower.encoder.parameters()).device
        pad, end = tower.tokenizer.pad_token_id, tower.tokenizer.eos_token_id
        hidden, pooled = [], None
        for chunk in self.chunks(text, tower):
            ids = list(chunk.tokens)
            if pad is not None and pad != end:  # after the first end token, the tokenizer's padding (OpenCLIP: "!")
                first_end = ids.index(end)
                ids[first_end + 1:] = [pad] * (len(ids) - first_end - 1)
            rows = {}
            for position, name in chunk.embeddings.items():
                rows[position] = self.embeddings.vectors_of(name, tower)
                self.used_embeddings.add(name)
            with _vectors_at(tower.encoder, rows), torch.no_grad():
                out = tower.encoder(torch.tensor([ids], device=device), output_hidden_states=tower.penultimate)
            states = out.hidden_states[-2] if tower.penultimate else out[0]
            if any(w != 1.0 for w in chunk.weights):
                states = original_emphasis(states, torch.tensor(chunk.weights))
            hidden.append(states)
            if tower.pooled and pooled is None:
                pooled = out[0]  # CLIPTextModelWithProjection: text_embeds; the first chunk's, as A1111
        return torch.cat(hidden, dim=1), pooled

    def encode(self, text: str) -> Conditioning:
        if text not in self._cache:
            parts = [self._encode_tower(text, t) for t in self.towers]
            hidden = torch.cat([h for h, _ in parts], dim=-1)
            pooled = next((p for _, p in parts if p is not None), None)
            dtype = self.towers[0].encoder.dtype
            self._cache[text] = Conditioning(hidden.to(dtype), None if pooled is None else pooled.to(dtype))
        return self._cache[text]


def pad_pair(cond: Conditioning, uncond: Conditioning, empty: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Both padded with the empty prompt's chunk to the longer one's length (A1111's CFG denoiser)."""
    def padded(c: Conditioning, tokens: int) -> Conditioning:
        missing = tokens - c.hidden.shape[1]
        if missing <= 0:
            return c
        repeats = missing // empty.hidden.shape[1]
        return Conditioning(torch.cat([c.hidden, empty.hidden.repeat(1, repeats, 1)], dim=1), c.pooled)

    tokens = max(cond.hidden.shape[1], uncond.hidden.shape[1])
    return padded(cond, tokens), padded(uncond, tokens)


@dataclass
class TextSchedule:
    """The prompt and negative prompt of one generation, per sampling step: what the pipeline is given
    at the start (:meth:`call_arguments`) and what replaces it when the text changes during the run
    (:meth:`in_loop`, from the step callback)."""

    encoder: PromptEncoder
    prompt: list[tuple[int, str]]
    negative: list[tuple[int, str]] | None  # None: SDXL's zeros for an empty negative prompt
    steps: int

    @classmethod
    def build(cls, pipe, prompt: str, negative_prompt: str, steps: int,
              embeddings: EmbeddingLibrary | None = None) -> "TextSchedule":
        prompt, negative_prompt = extract_networks(prompt)[0], extract_networks(negative_prompt)[0]  # LoRAs: loras.py
        zeros = not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False) and (
            getattr(pipe, "text_encoder_2", None) is not None)
        return cls(PromptEncoder(pipe, embeddings), prompt_schedule(prompt, steps),
                   None if zeros else prompt_schedule(negative_prompt, steps), steps)

    @property
    def changes(self) -> bool:
        """Whether the text changes during the run (prompt editing / alternation)."""
        return any(len({t for _, t in schedule}) > 1 for schedule in (self.prompt, self.negative or []))

    def at(self, step: int) -> tuple[Conditioning, Conditioning]:
        cond = self.encoder.encode(text_at_step(self.prompt, step))
        if self.negative is None:
            uncond = Conditioning(torch.zeros_like(cond.hidden),
                                  None if cond.pooled is None else torch.zeros_like(cond.pooled))
            return cond, uncond
        uncond = self.encoder.encode(text_at_step(self.negative, step))
        return pad_pair(cond, uncond, self.encoder.encode(""))

    def call_arguments(self) -> dict[str, torch.Tensor]:
        cond, uncond = self.at(0)
        out = {"prompt_embeds": cond.hidden, "negative_prompt_embeds": uncond.hidden}
        if cond.pooled is not None:
            out.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
        return out

    def tensor_names(self) -> list[str]:
        """The in-loop tensors the step callback replaces."""
        return ["prompt_embeds", "add_text_embeds"] if self.encoder.towers[-1].pooled else ["prompt_embeds"]

    def in_loop(self, step: int, images: int, guided: bool) -> dict[str, torch.Tensor]:
        """The tensors the pipeline's loop holds for ``step``: [negative x images, prompt x images] with
        guidance, [prompt x images] without (diffusers' layout)."""
        cond, uncond = self.at(step)

        def stacked(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            c = c.repeat(images, *[1] * (c.ndim - 1))
            return torch.cat([u.repeat(images, *[1] * (u.ndim - 1)), c]) if guided else c

        out = {"prompt_embeds": stacked(cond.hidden, uncond.hidden)}
        if cond.pooled is not None:
            out["add_text_embeds"] = stacked(cond.pooled, uncond.pooled)
        return out
