"""What a request loads: its adapters, their image encoders, the pipeline, the text diffs' text tower.

:class:`ModelLoader` loads afresh each time (the CLI); the server's
:class:`~imprompt.generation.cache.CachedLoader` keeps models between requests. :func:`load_models` checks each
adapter against its encoder before the pipeline loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..adapter.checkpoint import load_adapter
from ..encoding import ImageEncoder, check_encoder
from ..models.catalog import Catalog
from .adapter_options import AdapterOptions, load_encoders, text_diff_tower_path, text_diffs
from .networks import Networks
from .pipelines import load_pipeline, pick_device, pick_dtype, resolve_file
from .prompts import ImagePrompt
from .text_diff import TextDiff, TextTower

if TYPE_CHECKING:
    from .request import GenerateRequest


@dataclass
class LoadedModels:
    pipe: object
    adapters: list
    encoders: list[ImageEncoder]
    device: torch.device
    dtype: torch.dtype
    networks: Networks | None = None  # LoRAs and embeddings by name, for the prompts' tags and words
    text_diffs: list[TextDiff | None] | None = None  # per adapter: this request's text diffs, embedded

    def with_text_diffs(self, prompts: Sequence[ImagePrompt]) -> list[ImagePrompt]:
        """The prompts with this request's text diffs (each prompt's adapter's)."""
        if not self.text_diffs:
            return list(prompts)
        return [dataclasses.replace(p, text_diff=self.text_diffs[p.adapter]) if self.text_diffs[p.adapter] else p
                for p in prompts]


class ModelLoader:
    """Loads what a request needs, afresh each time (the CLI). The server's loader keeps models between
    requests (:class:`imprompt.server.engine.CachedLoader`)."""

    def adapter(self, file: Path, dtype: torch.dtype):
        return load_adapter(file, dtype)

    def encoders(self, options, files, adapters, dtype, device, catalog) -> list[ImageEncoder]:
        return load_encoders(options, files, adapters, dtype, device, catalog)

    def networks(self, catalog: Catalog | None) -> Networks:
        return Networks.from_catalog(catalog)

    def text_tower(self, path: Path, dtype: torch.dtype, device: torch.device) -> TextTower:
        tower = TextTower.from_pretrained(path, dtype)
        tower.model.to(device)
        return tower

    def pipeline(self, request: GenerateRequest, dtype: torch.dtype, device: torch.device):
        return load_pipeline(request.model, request.task, controlnet=request.controlnet or None, dtype=dtype,
                             device=device, memory=request.memory, model_config=request.model_config)


def load_models(request: GenerateRequest, options: Sequence[AdapterOptions], catalog: Catalog | None,
                loader: ModelLoader | None = None) -> LoadedModels:
    """The adapters, their image encoders (checked against each other), then the pipeline; with text diffs, their
    directions (embedded now: the CLI's text tower is let go before the denoising loop, the server's cached)."""
    loader = loader or ModelLoader()
    device = pick_device(request.device)
    dtype = pick_dtype(request.dtype, device)
    adapter_files = [resolve_file(o.file, "adapter") for o in options]
    adapters = [loader.adapter(f, dtype) for f in adapter_files]
    encoders = loader.encoders(options, adapter_files, adapters, dtype, device, catalog)
    for adapter, encoder in zip(adapters, encoders):
        if encoder is not None:  # None: a FaceID adapter that reads no CLIP features
            check_encoder(adapter.variant, encoder)
    pipe = loader.pipeline(request, dtype, device)
    diffs = None
    if any(o.text_diff for o in options):
        path = text_diff_tower_path(options, adapter_files, adapters, request.text_diff_encoder, catalog)
        width = next((e.output_width("image_embeds") for e in encoders if e is not None), None)
        tower = loader.text_tower(path, dtype, device) if path is not None else (
            TextTower.from_pipeline(pipe, width) if width is not None else None)
        diffs = text_diffs(options, adapters, encoders, tower)
    return LoadedModels(pipe, adapters, encoders, device, dtype, loader.networks(catalog), diffs)
