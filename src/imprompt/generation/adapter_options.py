"""Per-adapter options of a request: strings in, typed and checked objects out.

Per-adapter options (``scale``, ``layers``, ...) accept ``VALUE`` for every adapter or ``N=VALUE``
for adapter N (0-based, in ``--adapter`` order); ``image`` and ``negative_image`` accept ``PATH``
(adapter 0) or ``N=PATH``. :func:`adapter_options` turns them into one :class:`AdapterOptions` per
adapter before anything is read or loaded; :func:`load_image_prompts` and :func:`load_encoders` then
read what they name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

import torch

from ..adapter.embeds_scaling import check_embeds_scaling
from ..adapter.layers import PRESETS, LayerScales, parse_layer_scales
from ..adapter.weight_types import check_weight_type
from ..encoding import ImageEncoder, load_image
from ..models.catalog import Catalog
from ..models.pairing import find_encoder
from .negative_noise import NegativeNoise
from .embeds import ImageFeatures, load_embeds
from .pipelines import resolve_model
from .faceid import load_face_embedding
from .prompts import COMBINE_MODES, DEFAULT_SCALE, ImagePrompt
from .text_diff import (ARROW, DEFAULT_STRENGTH, TextDiff, TextTower, check_takes_text_diff, parse_text_diff,
                        text_diff)
from .tiles import TileOptions

if TYPE_CHECKING:
    from PIL import Image

    from .request import GenerateRequest

T = TypeVar("T")
MAX_SCALE = 100.0  # far beyond any useful image-prompt scale; 1e30 turns every pixel black


@dataclass(frozen=True)
class AdapterOptions:
    """One ``--adapter`` and everything given for it, parsed and checked."""

    index: int
    file: str
    images: tuple[str, ...]
    masks: tuple[str, ...] | None = None  # one per image, or None
    negative_images: tuple[str, ...] = ()
    image_encoder: str | None = None  # None: image_encoder/ beside the adapter file
    scale: float = DEFAULT_SCALE
    combine: str = "concat"
    weights: tuple[float, ...] | None = None
    layers: LayerScales | str | None = None  # a preset's name (resolved for the UNet later) or weights
    start: float = 0.0
    end: float = 1.0
    crop: str = "center"  # the same for every adapter (--crop)
    weight_type: str = "linear"
    composition_scale: float | None = None
    embeds_scaling: str = "V only"
    negative_noise: NegativeNoise | None = None
    embeds: str | None = None  # saved encoder features used instead of images (imprompt encode)
    tiles: TileOptions | None = None
    text_diff: tuple[str, str] | None = None  # (from, to): DALL-E 2's text diff (imprompt.generation.text_diff)
    text_diff_strength: float = DEFAULT_STRENGTH
    # FaceID adapters only (imprompt.generation.faceid)
    face_embeddings: tuple[str, ...] = ()  # .npy / .safetensors files, (512,) or (n, 512) each
    lora_scale: float = 1.0
    shortcut: bool | None = None  # None: on for FaceID-PlusV2 files
    s_scale: float = 1.0

    def describe(self) -> str:
        """The PNG info of this adapter: every option that acted, nothing else."""
        layers = self.layers.describe() if isinstance(self.layers, LayerScales) else self.layers
        parts = {
            "Model": Path(self.file).stem, "Weight": f"{self.scale:g}",
            "Images": "+".join(Path(p).name for p in self.images) or None, "Combine": self.combine,
            "Weights": ",".join(f"{w:g}" for w in self.weights) if self.weights else None,
            "Layers": layers, "Start": f"{self.start:g}", "End": f"{self.end:g}", "Crop": self.crop,
            "Masked": "yes" if self.masks else None, "Negative images": "yes" if self.negative_images else None,
            "Weight type": self.weight_type if self.weight_type != "linear" else None,
            "Composition weight": f"{self.composition_scale:g}" if self.composition_scale is not None else None,
            "Embeds scaling": self.embeds_scaling if self.embeds_scaling != "V only" else None,
            "Negative noise": self.negative_noise.describe() if self.negative_noise else None,
            "Embeds": Path(self.embeds).name if self.embeds else None,
            "Tiles": self.tiles.describe() if self.tiles else None,
            "Text diff": f"{self.text_diff[0]} {ARROW} {self.text_diff[1]} ({self.text_diff_strength:g})"
            if self.text_diff else None,
            "Face embeddings": "+".join(Path(p).name for p in self.face_embeddings) or None,
            "LoRA scale": f"{self.lora_scale:g}" if self.lora_scale != 1.0 else None,
            "Shortcut": {True: "on", False: "off", None: None}[self.shortcut],
            "S scale": f"{self.s_scale:g}" if self.s_scale != 1.0 else None,
        }
        return ", ".join(f"{k}: {v}" for k, v in parts.items() if v is not None)


_TARGETED = re.compile(r"^(\d+)=(.*)$", re.S)


def split_target(value: str) -> tuple[int | None, str]:
    """'2=foo' -> (2, 'foo'); 'foo' -> (None, 'foo')."""
    match = _TARGETED.match(value)
    return (int(match.group(1)), match.group(2)) if match else (None, value)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def per_adapter(values: Sequence[str], count: int, convert: Callable[[str], T], default: T, name: str) -> list[T]:
    """One value per adapter from 'VALUE' (all adapters not named otherwise) and 'N=VALUE' (adapter N)."""
    out = [default] * count
    targeted = set()
    for raw in values:
        index, text = split_target(raw)
        try:
            value = convert(text)
        except ValueError as err:
            raise ValueError(f"{_flag(name)} {raw!r}: {err}") from None
        if index is None:
            out = [value if i not in targeted else out[i] for i in range(count)]
        elif index >= count:
            raise ValueError(f"{_flag(name)} {raw!r} names adapter {index}, but {count} adapter(s) were given")
        else:
            out[index] = value
            targeted.add(index)
    return out


def grouped(values: Sequence[str], count: int, name: str) -> list[list[str]]:
    """Repeatable per-adapter lists: every 'PATH' goes to adapter 0, 'N=PATH' to adapter N."""
    groups: list[list[str]] = [[] for _ in range(count)]
    for raw in values:
        index, text = split_target(raw)
        index = 0 if index is None else index
        if index >= count:
            raise ValueError(f"{_flag(name)} {raw!r} names adapter {index}, but {count} adapter(s) were given")
        groups[index].append(text)
    return groups


def finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _scale(text: str) -> float:
    value = finite(text)
    if abs(value) > MAX_SCALE:
        raise ValueError(f"a scale beyond +-{MAX_SCALE:g} only overflows (image prompt scales are typically 0 to 1.5)")
    return value


def _weights(text: str) -> tuple[float, ...]:
    items = text.split(",")
    if any(not item.strip() for item in items):
        raise ValueError("expected numbers separated by commas, e.g. 0.7,0.3")
    return tuple(finite(item) for item in items)


def _combine(text: str) -> str:
    if text not in COMBINE_MODES:
        raise ValueError(f"expected one of {', '.join(COMBINE_MODES)}")
    return text


def _layers(text: str) -> LayerScales | str:
    if "=" in text:
        # Block names are checked against the UNet once it is loaded (attach checks them).
        return parse_layer_scales(text, "SD1.5")
    if text not in PRESETS:
        raise ValueError(f"unknown preset; choose one of {', '.join(PRESETS)} or give 'block=weight,...'")
    return text


def _combine_mode(text: str) -> str:
    return _combine(text.replace("_", " "))


TILE_WORDS = ("on", "masked", "enhance")


def _tiles(text: str) -> tuple[str, ...] | None:
    """'off', or words from on/masked/enhance joined by commas or '+' ('masked,enhance')."""
    words = tuple(w.strip() for w in text.replace("+", ",").split(","))
    if words == ("off",):
        return None
    bad = [w for w in words if w not in TILE_WORDS]
    if bad:
        raise ValueError(f"unknown tiling word {bad[0]!r}; expected off, or any of {', '.join(TILE_WORDS)} "
                         "joined by commas (e.g. masked,enhance)")
    return words


def fraction(text: str) -> float:
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected a fraction of the steps, 0 to 1")
    return value


def _fraction_of_arc(text: str) -> float:
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("expected the fraction of the way to the text diff's direction, 0 to 1 (0.25-0.5 usual)")
    return value


def _on_off(text: str) -> bool:
    if text.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise ValueError("expected on or off")
    return text.lower() in ("on", "true", "1")


PER_ADAPTER = ("scale", "combine", "weights", "layers", "start", "end", "mask", "negative_image", "image_encoder",
               "weight_type", "composition_scale", "embeds_scaling", "negative_noise",
               "embeds", "tiles", "tile_overlap", "tile_sharpen", "text_diff", "text_diff_strength",
               "face_embedding", "lora_scale", "shortcut", "s_scale")


def adapter_options(request: GenerateRequest) -> list[AdapterOptions]:
    """The per-adapter strings of ``request`` as one checked AdapterOptions per ``--adapter``."""
    count = len(request.adapter)
    if count == 0:
        given = [name for name in ("image", *PER_ADAPTER) if getattr(request, name)]
        if given:
            raise ValueError(f"{_flag(given[0])} applies to an image prompt, but no --adapter was given")
        return []
    images = grouped(request.image, count, "image")
    negatives = grouped(request.negative_image, count, "negative_image")
    scales = per_adapter(request.scale, count, _scale, DEFAULT_SCALE, "scale")
    combines = per_adapter(request.combine, count, _combine_mode, None, "combine")
    weights = per_adapter(request.weights, count, _weights, None, "weights")
    layers = per_adapter(request.layers, count, _layers, None, "layers")
    starts = per_adapter(request.start, count, fraction, 0.0, "start")
    ends = per_adapter(request.end, count, fraction, 1.0, "end")
    encoders = per_adapter(request.image_encoder, count, str, None, "image_encoder")
    weight_types = per_adapter(request.weight_type, count, check_weight_type, "linear", "weight_type")
    composition_scales = per_adapter(request.composition_scale, count, _scale, None, "composition_scale")
    scalings = per_adapter(request.embeds_scaling, count, check_embeds_scaling, "V only", "embeds_scaling")
    noises = per_adapter(request.negative_noise, count, NegativeNoise.parse, None, "negative_noise")
    embeds = grouped(request.embeds, count, "embeds")
    tiles = per_adapter(request.tiles, count, _tiles, None, "tiles")
    overlaps = per_adapter(request.tile_overlap, count, finite, None, "tile_overlap")
    sharpens = per_adapter(request.tile_sharpen, count, finite, None, "tile_sharpen")
    face_embeddings = grouped(request.face_embedding, count, "face_embedding")
    lora_scales = per_adapter(request.lora_scale, count, _scale, 1.0, "lora_scale")
    shortcuts = per_adapter(request.shortcut, count, _on_off, None, "shortcut")
    s_scales = per_adapter(request.s_scale, count, _scale, 1.0, "s_scale")
    diffs = per_adapter(request.text_diff, count, parse_text_diff, None, "text_diff")
    diff_strengths = per_adapter(request.text_diff_strength, count, _fraction_of_arc, None, "text_diff_strength")
    if request.mask and len(request.mask) != len(request.image):
        raise ValueError(f"give one --mask per --image: {len(request.image)} images, {len(request.mask)} masks")
    # Masks pair with --image in command-line order, whichever adapter each image goes to.
    masks = grouped([f"{split_target(i)[0] or 0}={m}" for i, m in zip(request.image, request.mask)], count, "mask")

    options = []
    for i, file in enumerate(request.adapter):
        if len(embeds[i]) > 1:
            raise ValueError(f"adapter {i} has {len(embeds[i])} --embeds files; give one per adapter "
                             "(`imprompt encode` takes several references into one file)")
        if embeds[i] and (images[i] or negatives[i] or tiles[i] or masks[i]):
            raise ValueError(f"adapter {i} has --embeds and --image/--negative-image/--tiles/--mask; the embeds "
                             "already hold the encoded references: give one or the other")
        if not images[i] and not embeds[i] and not face_embeddings[i]:
            raise ValueError(f"adapter {i} ({Path(file).name}) has no reference image; give --image {i}=PATH "
                             f"(or --embeds {i}=FILE; FaceID: --face-embedding {i}=FILE), or leave that --adapter out")
        if tiles[i] is None and (overlaps[i] is not None or sharpens[i] is not None):
            raise ValueError(f"adapter {i}: --tile-overlap / --tile-sharpen need --tiles (e.g. --tiles {i}=on)")
        tile_options = None
        if tiles[i] is not None:
            tile_options = TileOptions(overlap=overlaps[i] or 0.0, sharpen=sharpens[i] or 0.0,
                                       masks="masked" in tiles[i], enhance="enhance" in tiles[i])
            try:
                tile_options.check()
            except ValueError as err:
                raise ValueError(f"adapter {i}: {err}") from None
            if tile_options.masks and masks[i]:
                raise ValueError(f"adapter {i}: give --mask or --tiles masked, not both")
        combine = combines[i]
        if weights[i] is not None:
            # Weights act only when combining by weights: imply it, refuse a contradiction.
            if combine is None:
                combine = "weighted"
            elif combine != "weighted":
                raise ValueError(f"--weights is for --combine weighted, but adapter {i} has --combine {combine}; "
                                 "drop one of them")
            if not embeds[i] and not face_embeddings[i] and len(weights[i]) != len(images[i]):  # FaceID: per face, later
                raise ValueError(f"--weights for adapter {i}: {len(weights[i])} weights for {len(images[i])} images; "
                                 "give one weight per image")
            if sum(weights[i]) == 0:
                raise ValueError(f"--weights for adapter {i} sum to zero; give at least one non-zero weight")
        elif combine == "weighted":
            raise ValueError(f"--combine weighted (adapter {i}) needs --weights: one weight per image "
                             f"({len(images[i])} image(s))")
        combine = combine or "concat"
        if tile_options is not None and tile_options.masks and combine != "concat":
            raise ValueError(f"adapter {i}: masked tiles act per tile; use --combine concat with --tiles masked")
        if masks[i] and combine != "concat":
            raise ValueError(f"adapter {i}: region masks apply per image; use --combine concat with --mask")
        if combine == "subtract" and len(images[i]) < 2:
            raise ValueError(f"--combine subtract (adapter {i}) takes the later images away from the first: "
                             f"give at least two --image {i}=PATH")
        if diff_strengths[i] is not None and diffs[i] is None:
            raise ValueError(f"--text-diff-strength for adapter {i} needs a --text-diff {i}='FROM {ARROW} TO'")
        if not starts[i] < ends[i]:
            raise ValueError(f"adapter {i}: --start {starts[i]:g} must be below --end {ends[i]:g}")
        options.append(AdapterOptions(
            index=i, file=file, images=tuple(images[i]), masks=tuple(masks[i]) if request.mask else None,
            negative_images=tuple(negatives[i]), image_encoder=encoders[i], scale=scales[i], combine=combine,
            weights=weights[i], layers=layers[i], start=starts[i], end=ends[i], crop=request.crop,
            weight_type=weight_types[i], composition_scale=composition_scales[i], embeds_scaling=scalings[i],
            negative_noise=noises[i],
            embeds=embeds[i][0] if embeds[i] else None, tiles=tile_options,
            face_embeddings=tuple(face_embeddings[i]), lora_scale=lora_scales[i], shortcut=shortcuts[i],
            s_scale=s_scales[i], text_diff=diffs[i],
            text_diff_strength=DEFAULT_STRENGTH if diff_strengths[i] is None else diff_strengths[i],
        ))
    return options


ImageReader = Callable[..., "Image.Image"]  # (reference, mode="RGB") -> image; load_image reads files


def load_image_prompts(options: Sequence[AdapterOptions], read: ImageReader = load_image,
                       read_embeds: Callable[[str], ImageFeatures] = load_embeds) -> list[ImagePrompt]:
    """Read every reference, mask and negative image (the small inputs, before any model). ``read``
    turns a reference into an image, ``read_embeds`` an embeds name into features: files by default;
    the server's uploads, which it never writes."""
    return [
        ImagePrompt(
            images=[read(p) for p in o.images], adapter=o.index, scale=o.scale, combine=o.combine,
            weights=o.weights, layers=o.layers, start=o.start, end=o.end,
            masks=[read(m, "L") for m in o.masks] if o.masks else None,
            negative_images=[read(p) for p in o.negative_images] or None, crop=o.crop,
            weight_type=o.weight_type, composition_scale=o.composition_scale, embeds_scaling=o.embeds_scaling,
            negative_noise=o.negative_noise,
            embeds=read_embeds(o.embeds) if o.embeds else None, tiles=o.tiles,
            face_embeddings=[load_face_embedding(p) for p in o.face_embeddings] or None,
            lora_scale=o.lora_scale, shortcut=o.shortcut, s_scale=o.s_scale,
        )
        for o in options
    ]


def load_encoders(options: Sequence[AdapterOptions], adapter_files: Sequence[Path], adapters: Sequence,
                  dtype: torch.dtype, device: torch.device, catalog: Catalog | None = None) -> list[ImageEncoder]:
    """One image encoder per adapter: the one given, else the one its shapes need, found beside it
    or in the model folders (:func:`imprompt.models.pairing.find_encoder`); shared when the same."""
    loaded: dict[Path, ImageEncoder] = {}
    encoders = []
    for o, file, adapter in zip(options, adapter_files, adapters):
        path = encoder_path(o, file, adapter, catalog)
        if path is None:  # FaceID without CLIP: no encoder
            encoders.append(None)
            continue
        key = path.resolve()
        if key not in loaded:
            loaded[key] = ImageEncoder.load(path, dtype)
            loaded[key].model.to(device)
        encoders.append(loaded[key])
    return encoders


def encoder_path(o: AdapterOptions, adapter_file: Path, adapter, catalog: Catalog | None) -> Path | None:
    """The image encoder of one adapter: the one given, else the one its shapes need; None for the
    FaceID adapters that read only a face embedding."""
    if not adapter.variant.uses_image_encoder:
        return None
    if o.image_encoder is not None:
        given = Path(o.image_encoder)
        return given if given.is_file() else resolve_model(o.image_encoder, "image encoder")
    return find_encoder(adapter_file, adapter.variant, catalog)


def text_diff_tower_path(options: Sequence[AdapterOptions], adapter_files: Sequence[Path], adapters: Sequence,
                         given: str | None, catalog: Catalog | None) -> Path | None:
    """Where the text diffs' CLIP text tower is: ``given``, else an adapter's image encoder folder when it
    holds a whole CLIP (both towers); None: look in the pipeline (SDXL's ``text_encoder_2``)."""
    if given:
        return Path(given) if Path(given).exists() else resolve_model(given, "CLIP text tower")
    for o, file, adapter in zip(options, adapter_files, adapters):
        if o.text_diff is None or not adapter.variant.uses_image_encoder:
            continue
        path = encoder_path(o, file, adapter, catalog)
        if path is not None and _is_whole_clip(path):
            return path
    return None


def _is_whole_clip(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):  # no folder / config, or not a JSON object
        return False


def text_diffs(options: Sequence[AdapterOptions], adapters: Sequence, encoders: Sequence[ImageEncoder | None],
               tower: TextTower | None) -> list[TextDiff | None]:
    """Each adapter's text diff (None where it has none), its direction embedded by ``tower``, checked
    against the adapter's kind and its image embeddings' width."""
    out: list[TextDiff | None] = []
    for o, adapter, encoder in zip(options, adapters, encoders):
        if o.text_diff is None:
            out.append(None)
            continue
        check_takes_text_diff(adapter.variant, o.index)
        width = encoder.output_width("image_embeds") if encoder is not None else None
        if tower is None:
            raise ValueError(f"--text-diff for adapter {o.index} needs the CLIP text tower of its image encoder "
                             f"({width or 'its'}-wide image embeddings), and neither the pipeline nor the image "
                             "encoder folder has one: give --text-diff-encoder FOLDER (for SD1.5 IP-Adapters, "
                             "ViT-H: laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
        if width is not None and tower.width != width:
            raise ValueError(f"the text diffs' text tower gives {tower.width}-wide text embeddings, but adapter "
                             f"{o.index}'s image encoder gives {width}-wide image embeddings: a text diff needs the "
                             "text tower of the image encoder's own CLIP")
        out.append(text_diff(tower, *o.text_diff, o.text_diff_strength))
    return out
