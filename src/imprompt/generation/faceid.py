"""FaceID image prompts: face-ID embeddings in, image tokens (and the adapter's LoRA) out.

IP-Adapter-FaceID (h94/IP-Adapter-FaceID; tencent-ailab ``ip_adapter_faceid.py``) reads insightface's
512-wide face-recognition embedding instead of (FaceID, Portrait) or beside (Plus, PlusV2) CLIP's
features of the reference image. The embedding comes from a file (``.npy`` / ``.safetensors``, shape
``(512,)`` or ``(n, 512)``) or, with ``pip install imprompt[faceid]`` and insightface's buffalo_l model
files present, is computed from the reference images. As the official code, the unconditional side
is an all-zero face embedding (and, for Plus, CLIP's features of an all-zero image).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..adapter.variants import FACE_EMBEDDING_DIM, AdapterVariant
from ..encoding import ImageEncoder, check_encoder
from ..images import ImageInputError

FaceEmbeddingLike = np.ndarray | torch.Tensor
FACE_EMBEDDING_SUFFIXES = (".npy", ".safetensors")
MAX_FACE_EMBEDDING_BYTES = 16 * 2**20  # 8000 float32 embeddings; a larger file is not one
INSIGHTFACE_MODEL = "buffalo_l"  # the model the FaceID releases were trained with
INSTALL_HINT = (
    "pip install 'imprompt[faceid]' (insightface and onnxruntime) and put insightface's buffalo_l model files in "
    "~/.insightface/models/buffalo_l (or $INSIGHTFACE_HOME/models/buffalo_l); or give a precomputed 512-wide "
    "embedding instead: --face-embedding face.npy (Python: ImagePrompt(face_embeddings=...))"
)


class FaceEmbeddingError(ImageInputError):
    """A face embedding that cannot be used, or cannot be computed here."""


def check_face_embeddings(value: FaceEmbeddingLike | Sequence[FaceEmbeddingLike], source: str = "face embedding") -> torch.Tensor:
    """One embedding ``(512,)`` or several ``(n, 512)`` (or a list of either) -> float32 ``(n, 512)``."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise FaceEmbeddingError(f"{source}: an empty list; give at least one 512-wide face embedding")
        return torch.cat([check_face_embeddings(v, f"{source} {i}") for i, v in enumerate(value)])
    array = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
    if not (array.is_floating_point() or array.dtype in (torch.int32, torch.int64)) or array.ndim not in (1, 2):
        raise FaceEmbeddingError(
            f"{source} has shape {tuple(array.shape)} ({array.dtype}); expected numbers of shape ({FACE_EMBEDDING_DIM},) "
            f"or (n, {FACE_EMBEDDING_DIM}): insightface's face.normed_embedding, one row per face")
    array = array.reshape(-1, array.shape[-1]).float()
    if array.shape[-1] != FACE_EMBEDDING_DIM or array.shape[0] == 0:
        raise FaceEmbeddingError(
            f"{source} has shape {tuple(value.shape)}; expected ({FACE_EMBEDDING_DIM},) or (n, {FACE_EMBEDDING_DIM}) "
            "(insightface's face.normed_embedding, one row per face)")
    if not bool(torch.isfinite(array).all()):
        raise FaceEmbeddingError(f"{source} holds NaN or infinite values; compute the embedding again")
    return array


def load_face_embedding(path: str | os.PathLike) -> torch.Tensor:
    """A ``.npy`` (``np.save(path, face.normed_embedding)``) or ``.safetensors`` file (one tensor) ->
    ``(n, 512)``. ``.npy`` files are read without pickle: an object array is refused."""
    path = Path(path)
    if path.suffix not in FACE_EMBEDDING_SUFFIXES:
        raise FaceEmbeddingError(f"{path.name}: a face embedding is a .npy or .safetensors file, not {path.suffix or 'a file without extension'!r}")
    if not path.is_file():
        raise FaceEmbeddingError(f"face embedding file {path} does not exist")
    if path.stat().st_size > MAX_FACE_EMBEDDING_BYTES:
        raise FaceEmbeddingError(f"{path.name} is {path.stat().st_size} bytes, too large for face embeddings")
    try:
        if path.suffix == ".npy":
            value = np.load(path, allow_pickle=False)
        else:
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise FaceEmbeddingError(f"{path.name} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}); "
                                         "a face embedding file holds one, of shape (512,) or (n, 512)")
            value = next(iter(tensors.values()))
    except FaceEmbeddingError:
        raise
    except (ValueError, OSError) as err:  # numpy's pickle refusal and bad headers are ValueErrors
        raise FaceEmbeddingError(f"cannot read {path.name} as a face embedding: {str(err).splitlines()[0][:200]}") from None
    return check_face_embeddings(value, path.name)


def insightface_embeddings(images: Sequence, root: str | os.PathLike | None = None) -> torch.Tensor:
    """Each image's largest face -> its buffalo_l ``normed_embedding``, ``(len(images), 512)``.

    Needs the optional ``insightface`` package and the model files on disk (never downloaded here:
    a generation must not reach the network); otherwise the message says what to install and that a
    precomputed embedding works instead.
    """
    try:
        from insightface.app import FaceAnalysis
    except ImportError:
        raise FaceEmbeddingError(f"computing face embeddings needs insightface, which is not installed: {INSTALL_HINT}") from None
    home = Path(root or os.environ.get("INSIGHTFACE_HOME") or Path.home() / ".insightface")
    if not (home / "models" / INSIGHTFACE_MODEL).is_dir():
        raise FaceEmbeddingError(f"insightface's {INSIGHTFACE_MODEL} model files are not in {home / 'models'}: {INSTALL_HINT}")
    app = FaceAnalysis(name=INSIGHTFACE_MODEL, root=str(home), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    rows = []
    for i, image in enumerate(images):
        faces = app.get(np.asarray(image.convert("RGB"))[:, :, ::-1].copy())  # insightface reads BGR
        if not faces:
            raise FaceEmbeddingError(f"reference image {i}: insightface found no face; give a clearer face image "
                                     "or a precomputed --face-embedding")
        largest = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        rows.append(np.asarray(largest.normed_embedding, dtype=np.float32))
    return check_face_embeddings(np.stack(rows), "insightface embedding")


def combine_rows(rows: torch.Tensor, mode: str, weights: Sequence[float] | None) -> torch.Tensor:
    """As image features are combined: concat keeps every face (their tokens form one sequence, as
    FaceID-Portrait joins its faces), average / weighted fold them into one."""
    if mode == "concat":
        return rows
    if mode == "average":
        return rows.mean(dim=0, keepdim=True)
    w = torch.tensor(list(weights), dtype=rows.dtype, device=rows.device)
    return (rows * (w / w.sum()).view(-1, *[1] * (rows.ndim - 1))).sum(dim=0, keepdim=True)


def faceid_tokens(adapter, encoder: ImageEncoder | None, images: Sequence, faces: torch.Tensor | None, *,
                  combine: str = "concat", weights: Sequence[float] | None = None, crop: str = "center",
                  shortcut: bool | None = None, s_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(unconditional, conditional) image tokens of a FaceID prompt, each (units, tokens, dim).

    ``faces`` (n, 512), or None to compute them from ``images`` with insightface. FaceID-Plus also
    reads CLIP's penultimate hidden states of ``images`` (the face crops): one image per face, or one
    image for all. ``shortcut`` None: the adapter's default (on for PlusV2 files).
    """
    variant: AdapterVariant = adapter.variant
    if faces is None:
        if not images:
            raise FaceEmbeddingError(f"the {variant.name} adapter reads a face embedding: give one (--face-embedding "
                                     "face.npy; Python: ImagePrompt(face_embeddings=...)) or a face image")
        faces = insightface_embeddings(images)
    if not math.isfinite(s_scale):
        raise ValueError(f"s_scale must be a finite number, got {s_scale}")
    if combine == "weighted" and (weights is None or len(weights) != len(faces)):
        raise ValueError(f"combine='weighted' needs one weight per face: {len(faces)} face embeddings, "
                         f"{0 if weights is None else len(weights)} weights")
    hidden = uncond_hidden = None
    if variant.projection == "faceid_plus":
        if not images:
            raise ImageInputError(f"the {variant.name} adapter also reads CLIP features of the face: give the face image "
                                  "(a crop around the face) as the reference image")
        if encoder is None:
            raise ValueError(f"the {variant.name} adapter needs its CLIP image encoder ({variant.name})")
        check_encoder(variant, encoder)
        if len(images) not in (1, len(faces)):
            raise ImageInputError(f"FaceID-Plus pairs face images with face embeddings: {len(images)} images for "
                                  f"{len(faces)} embeddings (give one image per embedding, or one image for all)")
        pixels = encoder.pixels(images, crop)
        hidden = encoder.features(pixels, "penultimate_hidden")
        uncond_hidden = encoder.unconditional(pixels, "penultimate_hidden")
        hidden, uncond_hidden = (h.expand(len(faces), *h.shape[1:]) for h in (hidden, uncond_hidden))
        hidden, uncond_hidden = (combine_rows(h, combine, weights) for h in (hidden, uncond_hidden))
    faces = combine_rows(faces, combine, weights)
    use_shortcut = adapter.shortcut_default if shortcut is None else shortcut
    with torch.no_grad():
        cond = adapter.project_faces(faces, hidden, shortcut=use_shortcut, s_scale=s_scale)
        uncond = adapter.project_faces(torch.zeros_like(faces), uncond_hidden, shortcut=use_shortcut, s_scale=s_scale)
    return uncond, cond
