"""Extra networks by name: the LoRAs a prompt's ``<lora:...>`` tags name and the textual-inversion
embeddings its words name, found in the model folders (:class:`imprompt.models.catalog.Catalog`), read
once and kept for as long as the :class:`Networks` lives (one CLI run; the server's whole life)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..models.catalog import ModelLookupError
from .loras import LoraUse
from .prompt_syntax import NetworkTag, extract_networks, prompt_schedule
from .text_encoding import EmbeddingLibrary, PromptEncoder


def prompt_tags(prompt: str, negative_prompt: str = "") -> list[NetworkTag]:
    """The LoRA tags of both prompts (A1111 applies those of the negative prompt too), in order."""
    return extract_networks(prompt)[1] + extract_networks(negative_prompt)[1]


@dataclass
class Networks:
    """LoRA files by name (``name`` or ``folder/name``, case-insensitive, as the catalog resolves them)
    and the embedding library."""

    loras: Mapping[str, Path] = field(default_factory=dict)
    embeddings: EmbeddingLibrary = field(default_factory=EmbeddingLibrary)
    lora_cache: dict = field(default_factory=dict)  # path -> (mtime_ns, size, tensors), see loras.loras_applied
    catalog: object = None

    @classmethod
    def from_catalog(cls, catalog) -> "Networks":
        if catalog is None:
            return cls()
        return cls({e.name: e.path for e in catalog.of_kind("lora") if e.usable},
                   EmbeddingLibrary.from_catalog(catalog), catalog=catalog)

    def lora_path(self, name: str) -> Path:
        if self.catalog is not None:
            try:
                return Path(self.catalog.find(name, "lora").path)
            except ModelLookupError as err:
                raise ValueError(f"<lora:{name}:...>: {err}") from None
        if name in self.loras:
            return Path(self.loras[name])
        known = ", ".join(sorted(self.loras)[:8]) or "none: give the model folders with --models-dir"
        raise ValueError(f"<lora:{name}:...>: no LoRA named {name!r} (known: {known})")

    def uses(self, tags: list[NetworkTag]) -> list[LoraUse]:
        """Tags -> LoRA files with their multipliers; the same LoRA twice is one LoRA with summed
        multipliers (A1111 would apply it twice, which is the same sum)."""
        merged: dict[Path, LoraUse] = {}
        for tag in tags:
            path = self.lora_path(tag.name)
            if path in merged:
                old = merged[path]
                merged[path] = LoraUse(path, old.name, old.te + tag.te, old.unet + tag.unet)
            else:
                merged[path] = LoraUse(path, tag.name, tag.te, tag.unet)
        return list(merged.values())

    def lora_hashes(self, uses: list[LoraUse]) -> dict[str, str]:
        """A1111's ``Lora hashes``: the addnet hash (12 hex digits) for safetensors, the file's SHA-256
        otherwise."""
        from ..models.hashes import addnet_short_hash, sha256_file

        return {u.name: addnet_short_hash(u.path) if u.path.suffix.lower() == ".safetensors" else sha256_file(u.path)[:12]
                for u in uses}

    def embeddings_in(self, pipe, prompt: str, negative_prompt: str, steps: int) -> list[str]:
        """The embedding names the prompts use (every text of their schedules), in first-use order."""
        encoder = PromptEncoder(pipe, self.embeddings)
        if not encoder.available or not self.embeddings.files:
            return []
        found: dict[str, None] = {}
        for text in (prompt, negative_prompt):
            for _, step_text in prompt_schedule(extract_networks(text)[0], steps):
                for chunk in encoder.chunks(step_text, encoder.towers[0]):
                    found.update(dict.fromkeys(chunk.embeddings.values()))
        return list(found)


def parameters_of(networks: Networks | None, pipe, prompt: str, negative_prompt: str, steps: int) -> dict[str, str]:
    """The PNG-info entries A1111 writes for extra networks: ``Lora hashes`` and ``TI hashes``, each
    ``name: hash, name: hash`` (quoted when written, as every value with a comma or colon)."""
    out = {}
    if networks is None:
        return out
    tags = prompt_tags(prompt, negative_prompt)
    if tags:
        out["Lora hashes"] = ", ".join(f"{n}: {h}" for n, h in networks.lora_hashes(networks.uses(tags)).items())
    names = networks.embeddings_in(pipe, prompt, negative_prompt, steps)
    if names:
        out["TI hashes"] = ", ".join(f"{n}: {h}" for n, h in networks.embeddings.hashes(names).items())
    return out

