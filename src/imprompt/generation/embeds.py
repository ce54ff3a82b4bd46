"""Image features as data: encoded from references (tiled or not), saved, loaded, checked.

The arrow "reference images -> encoder features" of an image prompt, made a value of its own
(:class:`ImageFeatures`): the encoder output the adapter's projection reads (pooled ``image_embeds``
for base adapters, penultimate hidden states for plus and full-face), for the conditional and the
unconditional branch. ``imprompt encode`` computes it once and writes it; ``--embeds`` uses it instead
of the references (no image is read, the encoder's work is skipped).

On disk, one adapter's features are one tensor in the layout diffusers documents for
``ip_adapter_image_embeds`` (and produces in ``prepare_ip_adapter_image_embeds``):
``torch.cat([negative, positive])`` of shape (2, images, dim) or (2, images, tokens, width), with
string metadata naming the encoder output, width, token count, image size, encoder and the adapter it
was made for:

* ``.safetensors``: tensor ``image_embeds``, metadata in the header (no code can run on load);
* ``.ipadpt`` (ComfyUI_IPAdapter_plus's extension; it ``torch.save``s the embeds): a dict
  ``{"image_embeds": tensor, "metadata": {str: str}}``, read with ``torch.load(weights_only=True)``
  only. ComfyUI's ``IPAdapterLoadEmbeds`` expects a bare tensor instead; ``embeds["image_embeds"][1]``
  is the positive tensor it wants.

Read as well, without metadata (interpreted by the adapter's variant when used): a bare tensor or a
one-tensor file in diffusers' layout (negative half first), and ComfyUI's bare positive embeds
(``IPAdapterEncoder`` output: (images, dim) or (images, tokens, width)), whose unconditional half is
then the encoder's own "no image" features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..adapter.variants import DISPLAY_NAMES, CheckpointError, EncoderOutput, encoder_family_of
from ..files import atomic_path, check_regular_file, load_torch_weights
from .tiles import Region, TileOptions, cut_tiles

if TYPE_CHECKING:
    from PIL import Image

    from ..adapter.variants import AdapterVariant
    from ..encoding import CropMode, ImageEncoder

FORMAT = "imprompt.ip_adapter_image_embeds"
VERSION = "1"
TENSOR_KEY = "image_embeds"
SUFFIXES = (".safetensors", ".ipadpt")
MAX_EMBEDS_BYTES = 1 << 30
OUTPUT_NAMES = {"image_embeds": "image_embeds (the pooled embedding base adapters read)",
                "penultimate_hidden": "penultimate hidden states (what plus and full-face adapters read)"}


class EmbedsError(CheckpointError):
    """An embeds file that cannot be read, or does not fit the adapter it is used with."""


@dataclass
class ImageFeatures:
    """One adapter's encoder features: what its projection reads, per unit (a reference or a tile).

    ``conditional``: (units, dim) for ``image_embeds``, (units, tokens, width) for hidden states.
    ``unconditional``: the same shape; one row = shared by every unit (negative images: added after
    the units are combined, as the untiled path does); None = the encoder's own "no image" features,
    computed when used (ComfyUI's bare positive embeds). ``output`` None: a bare 3-D tensor, which
    is (2, images, dim) in diffusers' layout for a base adapter and ComfyUI's (images, tokens, width)
    for a plus adapter; :meth:`for_output` reads it once the adapter is known.
    ``units_per_reference``: how many units each reference became (tiles); None = one each.
    ``regions``: per unit, the part of the output it acts on (fractions l, t, r, b), or None.
    ``tuning``: for features tuned on their references (``imprompt tune``), the settings and final loss.
    """

    conditional: torch.Tensor
    unconditional: torch.Tensor | None
    output: EncoderOutput | None
    image_size: int | None = None
    encoder: str | None = None
    adapter: str | None = None
    units_per_reference: tuple[int, ...] | None = None
    regions: tuple[Region | None, ...] | None = None
    tuning: str | None = None  # how tuned features were made (imprompt.training.tune), as JSON

    @property
    def units(self) -> int:
        return self.conditional.shape[0]

    @property
    def references(self) -> int:
        return len(self.units_per_reference) if self.units_per_reference else self.units

    @property
    def width(self) -> int:
        return self.conditional.shape[-1]

    @property
    def tokens(self) -> int | None:
        return self.conditional.shape[1] if self.conditional.ndim == 3 else None

    def reference_rows(self) -> list[slice]:
        """The rows (units) of each reference."""
        counts = self.units_per_reference or (1,) * self.units
        starts = [sum(counts[:i]) for i in range(len(counts))]
        return [slice(s, s + n) for s, n in zip(starts, counts)]

    def unit_weights(self, weights: Sequence[float] | None) -> list[float] | None:
        """Per-reference weights spread over its units (each of n tiles gets weight / n)."""
        if weights is None or self.units_per_reference is None:
            return None if weights is None else list(weights)
        return [w / n for w, n in zip(weights, self.units_per_reference) for _ in range(n)]

    def for_output(self, output: EncoderOutput) -> "ImageFeatures":
        """Features of a bare 3-D tensor read as the encoder output ``output`` (see the class doc)."""
        if self.output is not None:
            return self
        if output == "image_embeds":
            return from_diffusers(self.conditional, "image_embeds")
        return replace(self, output="penultimate_hidden")

    def to(self, like: torch.Tensor) -> "ImageFeatures":
        def move(t):
            return None if t is None else t.to(device=like.device, dtype=like.dtype)

        return replace(self, conditional=move(self.conditional), unconditional=move(self.unconditional))

    def diffusers_layout(self) -> torch.Tensor:
        """``torch.cat([negative, positive])`` of shape (2, units, ...), as diffusers'
        ``ip_adapter_image_embeds[i]`` with guidance and one image per prompt."""
        if self.unconditional is None:
            raise ValueError("these features have no unconditional half (compute them with an encoder first)")
        negative = self.unconditional.expand_as(self.conditional)
        return torch.stack([negative, self.conditional])

    def metadata(self) -> dict[str, str]:
        shared = self.unconditional is not None and self.unconditional.shape[0] == 1 and self.units > 1
        return {
            "format": FORMAT, "version": VERSION, "encoder_output": str(self.output), "width": str(self.width),
            "tokens": str(self.tokens or ""), "image_size": str(self.image_size or ""),
            "encoder": self.encoder or "", "adapter": self.adapter or "",
            "shared_unconditional": "true" if shared else "false",
            "units_per_reference": json.dumps(list(self.units_per_reference)) if self.units_per_reference else "",
            "regions": json.dumps(list(self.regions)) if self.regions else "",
            "tuning": self.tuning or "",
        }


def encode_references(images: Sequence[Image.Image], encoder: ImageEncoder, output: EncoderOutput,
                      crop: CropMode = "center", negative_images: Sequence[Image.Image] | None = None,
                      tiles: TileOptions | None = None) -> ImageFeatures:
    """Reference images -> encoder features (conditional and unconditional), tiled if asked.

    Untiled: one unit per reference, the encoder's preprocessing (``crop``). Tiled: each reference
    becomes its tiles (:mod:`imprompt.generation.tiles`), preceded by the whole reference if
    ``tiles.enhance``. The unconditional features are the encoder's "no image" features per unit
    (official definition), or the mean of the ``negative_images``' features, shared by all units.
    """
    size = encoder.model.config.image_size
    counts, regions, units = None, None, list(images)
    if tiles is not None:
        tiles.check()
        units, counts, regions = [], [], []
        for image in images:
            cut = cut_tiles(image, size, tiles)
            whole = [image] if tiles.enhance else []
            units += whole + cut.images
            counts.append(len(whole) + len(cut.images))
            regions += [None] * len(whole) + (list(cut.regions) if tiles.masks else [None] * len(cut.images))
        if not tiles.masks:
            regions = None
    # Tiles are already the encoder's size: its processor leaves them as they are (a whole reference
    # for `enhance` goes through the usual crop).
    pixels = encoder.pixels(units, crop)
    cond = encoder.features(pixels, output)
    if negative_images:
        negative = encoder.features(encoder.pixels(negative_images, crop), output)
        uncond = negative.mean(dim=0, keepdim=True)
    else:
        uncond = encoder.unconditional(pixels, output)
    return ImageFeatures(cond, uncond, output, size, encoder.describe(output),
                         units_per_reference=tuple(counts) if counts else None,
                         regions=tuple(regions) if regions else None)


def fill_unconditional(features: ImageFeatures, encoder: ImageEncoder) -> ImageFeatures:
    """Bare positive embeds get the encoder's own "no image" features (zeros, or the hidden states
    of an all-zero pixel tensor), as ComfyUI's IPAdapterEmbeds does when no negative is given."""
    if features.unconditional is not None:
        return features
    size = encoder.model.config.image_size
    param = next(encoder.model.parameters())
    zeros = torch.zeros(features.units, 3, size, size, device=param.device, dtype=param.dtype)
    return replace(features, unconditional=encoder.unconditional(zeros, features.output))


def from_diffusers(tensor: torch.Tensor, output: EncoderOutput | None = None) -> ImageFeatures:
    """Features from one entry of diffusers' ``ip_adapter_image_embeds``: (2 * batch, images, ...),
    the negative half first. Every batch row must be the same (diffusers repeats one per image)."""
    if tensor.ndim not in (3, 4):
        raise EmbedsError(f"diffusers' ip_adapter_image_embeds entries are (2*batch, images, dim) or (2*batch, images, "
                          f"tokens, width); got shape {tuple(tensor.shape)}")
    if tensor.shape[0] % 2:
        raise EmbedsError(f"an ip_adapter_image_embeds tensor with guidance holds torch.cat([negative, positive]) "
                          f"(an even first dimension); got shape {tuple(tensor.shape)}: save it with its negative half")
    negative, positive = tensor.chunk(2)
    if any(not torch.equal(half[0], row) for half in (negative, positive) for row in half[1:]):
        raise EmbedsError(f"the tensor of shape {tuple(tensor.shape)} holds {positive.shape[0]} different embeds "
                          "per half; imprompt takes one set per adapter (give one prompt's embeds)")
    found = "image_embeds" if tensor.ndim == 3 else "penultimate_hidden"
    # The unconditional image_embeds are zeros; zeros in the positive half instead mean the halves are
    # the other way round, as ComfyUI_IPAdapter_plus's first IPAdapterEncoder stacked them
    # (torch.stack((cond, zeros))). Refused rather than generated from an all-zero prompt.
    if found == "image_embeds" and not positive.any() and negative.any():
        raise EmbedsError(f"the positive half of the tensor of shape {tuple(tensor.shape)} is all zeros and the negative "
                          "half is not: the halves look swapped (old ComfyUI order, positive first); save "
                          "torch.cat([negative, positive]) (e.g. tensor.flip(0)) or re-encode with `imprompt encode`")
    if output is not None and output != found:
        raise EmbedsError(f"a {tensor.ndim}-D diffusers tensor holds {OUTPUT_NAMES[found]}, not {OUTPUT_NAMES[output]}")
    return ImageFeatures(positive[0].float(), negative[0].float(), found)


def _bare(tensor: torch.Tensor, where: str) -> ImageFeatures:
    """A tensor without metadata: ComfyUI's positive embeds (2-D), diffusers' layout (4-D), or
    either (3-D, decided by the adapter: :meth:`ImageFeatures.for_output`)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise EmbedsError(f"{where} holds no floating-point tensor of image embeds")
    if tensor.ndim == 2:
        return ImageFeatures(tensor.float(), None, "image_embeds")
    if tensor.ndim == 4:
        return from_diffusers(tensor)
    if tensor.ndim == 3:
        return ImageFeatures(tensor.float(), None, None)
    raise EmbedsError(f"{where}: image embeds of shape {tuple(tensor.shape)}; expected ComfyUI's (images, dim) or "
                      "(images, tokens, width), or diffusers' (2, images, dim) or (2, images, tokens, width)")


def _from_metadata(tensor: torch.Tensor, meta: dict[str, str], where: str) -> ImageFeatures:
    if meta.get("version") != VERSION:
        raise EmbedsError(f"{where} is imprompt embeds version {meta.get('version')!r}; this imprompt reads version "
                          f"{VERSION}: re-encode the references with `imprompt encode`")
    if meta.get("encoder_output") not in OUTPUT_NAMES:
        raise EmbedsError(f"{where}: metadata names encoder output {meta.get('encoder_output')!r}; expected one of "
                          f"{', '.join(OUTPUT_NAMES)} (re-encode it with `imprompt encode`)")
    try:
        features = from_diffusers(tensor, meta["encoder_output"])
        counts = json.loads(meta["units_per_reference"]) if meta.get("units_per_reference") else None
        regions = json.loads(meta["regions"]) if meta.get("regions") else None
        image_size = int(meta["image_size"]) if meta.get("image_size") else None
    except (KeyError, ValueError) as err:  # EmbedsError is a ValueError: keep its own message
        if isinstance(err, EmbedsError):
            raise EmbedsError(f"{where}: {err}") from None
        raise EmbedsError(f"{where}: unreadable metadata ({type(err).__name__}: {err}); re-encode it") from None
    if counts is not None and sum(counts) != features.units:
        raise EmbedsError(f"{where}: metadata counts {sum(counts)} units, the tensor holds {features.units}")
    if regions is not None and len(regions) != features.units:
        raise EmbedsError(f"{where}: metadata has {len(regions)} regions for {features.units} units")
    uncond = features.unconditional[:1] if meta.get("shared_unconditional") == "true" else features.unconditional
    return replace(features, unconditional=uncond, image_size=image_size, encoder=meta.get("encoder") or None,
                   adapter=meta.get("adapter") or None, tuning=meta.get("tuning") or None,
                   units_per_reference=tuple(counts) if counts else None,
                   regions=tuple(tuple(r) if r is not None else None for r in regions) if regions else None)


def save_embeds(path: str | Path, features: ImageFeatures) -> Path:
    """Write ``features`` as ``.safetensors`` or ``.ipadpt`` (see the module doc), atomically."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"embeds are written as {' or '.join(SUFFIXES)}; got {path.name!r}")
    if features.output is None:
        raise ValueError("these features do not say which encoder output they are (a bare 3-D tensor); "
                         "read them for an adapter first: features.for_output(variant.encoder_output)")
    tensor = features.diffusers_layout().detach().to("cpu", torch.float32).contiguous()
    meta = features.metadata()
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({TENSOR_KEY: tensor}, str(tmp), metadata=meta)
        else:
            torch.save({TENSOR_KEY: tensor, "metadata": meta}, tmp)
    return path


def load_embeds(path: str | Path) -> ImageFeatures:
    """Read embeds written by ``imprompt encode``, diffusers or ComfyUI; pickles are never executed."""
    path = Path(path)
    where = f"embeds file {path.name}"
    if path.suffix == ".safetensors":
        check_regular_file(path, MAX_EMBEDS_BYTES, "embeds file")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta, keys = f.metadata() or {}, list(f.keys())
                state = {k: f.get_tensor(k) for k in keys}
        except (SafetensorError, OSError, ValueError) as err:
            raise EmbedsError(f"cannot read {where}: not a safetensors file ({err})") from None
    else:
        state = load_torch_weights(path, what="embeds file")
        meta = {}
        if isinstance(state, dict) and isinstance(state.get("metadata"), dict):
            meta = {str(k): str(v) for k, v in state["metadata"].items()}
            state = {k: v for k, v in state.items() if k != "metadata"}
        elif isinstance(state, (list, tuple)):
            if len(state) != 1:
                raise EmbedsError(f"{where} holds a list of {len(state)} tensors (one per adapter, as diffusers' "
                                  "ip_adapter_image_embeds); save each adapter's tensor in its own file")
            state = {TENSOR_KEY: state[0]}
        elif isinstance(state, torch.Tensor):
            state = {TENSOR_KEY: state}
    if not isinstance(state, dict) or len(state) != 1:
        found = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
        raise EmbedsError(f"{where} should hold one tensor of image embeds (key {TENSOR_KEY!r}); found {found}")
    tensor = next(iter(state.values()))
    if meta.get("format") == FORMAT:
        return _from_metadata(tensor, meta, where)
    return _bare(tensor, where)


def embeds_file_bytes(features: ImageFeatures) -> bytes:
    """``features`` as the bytes of a ``.safetensors`` embeds file (what the server sends back)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="imprompt-embeds-") as folder:
        return save_embeds(Path(folder) / "embeds.safetensors", features).read_bytes()


def embeds_from_bytes(data: bytes, name: str = "embeds") -> ImageFeatures:
    """Embeds sent as bytes (an upload): the bytes of a ``.safetensors`` file, or of an ``.ipadpt``
    (``torch.save``, read with ``weights_only=True`` as :func:`load_embeds` reads files). The format
    is told by the bytes, not the name: safetensors opens with its header's length and a JSON ``{``."""
    import tempfile

    if len(data) > MAX_EMBEDS_BYTES:
        raise EmbedsError(f"{name}: {len(data)} bytes is over the {MAX_EMBEDS_BYTES} bytes embeds limit")
    is_safetensors = len(data) > 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8
    if not is_safetensors and not data.startswith(b"PK\x03\x04"):
        raise EmbedsError(f"{name}: neither a .safetensors file nor a torch-saved .ipadpt (the first bytes are "
                          f"{data[:8]!r}); send the file `imprompt encode` or `imprompt tune` wrote")
    with tempfile.TemporaryDirectory(prefix="imprompt-embeds-") as folder:
        path = Path(folder) / ("upload.safetensors" if is_safetensors else "upload.ipadpt")
        path.write_bytes(data)
        try:
            return load_embeds(path)
        except (EmbedsError, ValueError) as err:  # name the upload, not the temporary file
            raise EmbedsError(str(err).replace(path.name, name)) from None


def check_features(features: ImageFeatures, variant: AdapterVariant, encoder: ImageEncoder | None = None,
                   source: str = "the embeds") -> None:
    """Raise unless ``features`` are what ``variant``'s projection reads (and, given ``encoder``,
    what that encoder produces), naming what was expected, what was found, and the fix."""
    fix = "re-encode the references for this adapter: `imprompt encode REF --adapter ADAPTER -o FILE`"
    made_for = f" (made for the {features.adapter} adapter)" if features.adapter else ""
    expected, found = variant.encoder_output, features.output
    kind = DISPLAY_NAMES[variant.projection]
    if found != expected:
        raise EmbedsError(f"{source} hold {OUTPUT_NAMES[found]}{made_for}, but the {kind} adapter reads "
                          f"{OUTPUT_NAMES[expected]}; {fix}")
    if features.width != variant.image_embed_dim:
        raise EmbedsError(
            f"{source} have width {features.width} ({encoder_family_of(found, features.width)}){made_for}, but the "
            f"{variant.name} adapter reads width {variant.image_embed_dim} "
            f"({encoder_family_of(expected, variant.image_embed_dim)}); {fix}")
    if encoder is not None and features.tokens is not None and features.tokens != encoder.sequence_length:
        raise EmbedsError(
            f"{source} have {features.tokens} tokens per image (encoder image size {features.image_size or '?'}), but "
            f"the image encoder gives {encoder.sequence_length} (image size {encoder.model.config.image_size}); {fix}")
