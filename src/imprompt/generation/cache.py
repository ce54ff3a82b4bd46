"""Caches for runs that generate more than once: loaded models and reference embeddings.

- :class:`ModelCache`: loaded pipelines, adapters and image encoders, least recently used first out once
  their parameter bytes pass the budget. Loading is the slow part (seconds to a minute for SD), so the
  second request (server) or grid cell (``imprompt grid``) with the same model starts at once.
- :class:`EmbeddingCache`: CLIP features by the content of the preprocessed pixels (sha256 of the
  tensor), so a reference seen again is not encoded again. Exact: the same pixels give the same tensor.
- :class:`CachedLoader`: :class:`~imprompt.generation.loading.ModelLoader` through both.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

from ..encoding import ImageEncoder
from .adapter_options import encoder_path
from .loading import ModelLoader
from .request import GenerateRequest


def module_bytes(obj: Any) -> int:
    """Parameter and buffer bytes of a module, or of a pipeline's modules."""
    modules = [obj] if isinstance(obj, torch.nn.Module) else [
        m for m in getattr(obj, "components", {}).values() if isinstance(m, torch.nn.Module)]
    if isinstance(obj, ImageEncoder):
        modules = [obj.model]
    return sum(t.numel() * t.element_size() for m in modules for t in itertools.chain(m.parameters(), m.buffers()))


class ModelCache:
    """Loaded models by key, evicted least recently used first when their bytes pass ``budget_bytes``
    (the newest always stays, even if alone it is over the budget)."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._items: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a loader ran (tests count them)

    def get(self, key: tuple, load: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
        value = load()  # outside the lock: only the worker loads, and listing must not wait on it
        with self._lock:
            self.loads += 1
            self._items[key] = (value, module_bytes(value))
            self._items.move_to_end(key)
            while len(self._items) > 1 and sum(size for _, size in self._items.values()) > self.budget:
                self._items.popitem(last=False)
        return value

    def keys(self) -> list[tuple]:
        with self._lock:
            return list(self._items)

    @property
    def bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._items.values())


class EmbeddingCache:
    """CLIP features by (encoder, output, the preprocessed pixels' content); ``computed`` counts the
    encoder calls actually made."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.computed = 0
        self.hits = 0

    def features(self, encoder: ImageEncoder, pixels: torch.Tensor, output: str,
                 compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        digest = hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        key = (id(encoder.model), output, str(pixels.dtype), tuple(pixels.shape), digest)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key].clone()
        value = compute()
        with self._lock:
            self.computed += 1
            if self.capacity:
                self._items[key] = value.clone()
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
        return value


class CachingEncoder(ImageEncoder):
    """An image encoder whose features go through an :class:`EmbeddingCache`; same model, same results."""

    def __init__(self, inner: ImageEncoder, cache: EmbeddingCache):
        super().__init__(inner.model, inner.processor)
        self.cache = cache

    def features(self, pixels: torch.Tensor, output) -> torch.Tensor:
        return self.cache.features(self, pixels, output, lambda: ImageEncoder.features(self, pixels, output))


class CachedLoader(ModelLoader):
    """:class:`~imprompt.generation.loading.ModelLoader` through the server's caches."""

    def __init__(self, models: ModelCache, embeddings: EmbeddingCache):
        self.models, self.embeddings = models, embeddings
        self._networks: tuple = (None, None)  # (catalog, Networks): LoRA files and embeddings read once per scan

    def networks(self, catalog):
        if self._networks[0] is not catalog:
            self._networks = (catalog, super().networks(catalog))
        return self._networks[1]

    @staticmethod
    def _stamp(path: Path) -> tuple:
        try:  # a file replaced on disk is loaded again
            info = path.stat()
            return str(path.resolve()), info.st_mtime_ns, info.st_size
        except OSError:
            return (str(path),)

    def adapter(self, file: Path, dtype: torch.dtype):
        return self.models.get(("adapter", self._stamp(file), str(dtype)), lambda: super(CachedLoader, self).adapter(file, dtype))

    def encoders(self, options, files, adapters, dtype, device, catalog) -> list[ImageEncoder]:
        out = []
        for o, file, adapter in zip(options, files, adapters):
            path = encoder_path(o, file, adapter, catalog)
            if path is None:  # FaceID without CLIP: no encoder
                out.append(None)
                continue

            def load(path=path):
                encoder = ImageEncoder.load(path, dtype)
                encoder.model.to(device)
                return CachingEncoder(encoder, self.embeddings)

            out.append(self.models.get(("encoder", self._stamp(path), str(dtype), str(device)), load))
        return out

    def text_tower(self, path: Path, dtype: torch.dtype, device: torch.device):
        return self.models.get(("text tower", self._stamp(path), str(dtype), str(device)),
                               lambda: super(CachedLoader, self).text_tower(path, dtype, device))

    def pipeline(self, request: GenerateRequest, dtype: torch.dtype, device: torch.device):
        key = ("pipeline", self._stamp(Path(request.model)), request.task,
               tuple(self._stamp(Path(c)) for c in request.controlnet), str(dtype), str(device),
               request.memory, request.model_config)
        return self.models.get(key, lambda: super(CachedLoader, self).pipeline(request, dtype, device))
