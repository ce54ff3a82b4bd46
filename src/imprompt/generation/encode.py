"""``imprompt encode``: references -> the image features an adapter reads, written to a file.

The file (:mod:`imprompt.generation.embeds`) replaces the references in ``imprompt generate --embeds``:
the same pixels as generating from the references, without reading them or running the encoder's
forward pass again. What is encoded is fixed here: crop mode, negative images and tiling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import option
from ..encoding import CROP_MODES, ImageEncoder, load_image
from ..files import check_writable_folder
from ..models.catalog import Catalog, resolve_name, roots_from
from .embeds import SUFFIXES, encode_references, save_embeds
from .pipelines import pick_device, resolve_file, resolve_model
from .tiles import TileOptions

ENCODER_OUTPUTS = ("image_embeds", "penultimate_hidden")


@dataclass
class EncodeConfig:
    # The references are the command's positional arguments (imprompt encode REF...)
    references: list[str] = field(default_factory=list)
    adapter: str | None = field(default=None, metadata=option(
        "the IP-Adapter the embeds are for (its variant decides the encoder output; its image encoder is found "
        "beside it or in --models-dir)", metavar="FILE"))
    image_encoder: str | None = field(default=None, metadata=option(
        "image encoder (CLIP vision folder, single file or name); default: the one --adapter needs", metavar="PATH"))
    encoder_output: str | None = field(default=None, metadata=option(
        "without --adapter: which output to save, image_embeds (base adapters) or penultimate_hidden (plus, "
        "full-face)", choices=list(ENCODER_OUTPUTS)))
    output: str = field(default="", metadata=option(
        f"the file to write ({' or '.join(SUFFIXES)})", short="-o", metavar="FILE"))
    negative_image: list[str] = field(default_factory=list, metadata=option(
        "negative image (its features replace the unconditional ones; averaged if several)", metavar="PATH"))
    crop: str = field(default="center", metadata=option(
        "reference preprocessing: center crop (CLIP) or pad to square", choices=list(CROP_MODES)))
    tiles: bool = field(default=False, metadata=option("cut each reference into encoder-sized tiles"))
    tile_masks: bool = field(default=False, metadata=option("with --tiles: each tile acts on its part of the output"))
    enhance: bool = field(default=False, metadata=option("with --tiles: encode the whole reference too, first"))
    tile_overlap: float = field(default=0.0, metadata=option("with --tiles: least overlap of tiles, 0 to 0.9"))
    tile_sharpen: float = field(default=0.0, metadata=option("with --tiles: contrast-adaptive sharpening, 0 to 1"))
    models_dir: list[str] = field(default_factory=list, metadata=option(
        "model folders where --adapter and --image-encoder names are looked up", metavar="DIR"))
    device: str = field(default="auto", metadata=option("torch device: auto, cpu, cuda, cuda:N or mps"))

    @property
    def tile_options(self) -> TileOptions | None:
        if not self.tiles:
            return None
        return TileOptions(self.tile_overlap, self.tile_sharpen, self.tile_masks, self.enhance)

    def check(self) -> None:
        if not self.references:
            raise ValueError("imprompt encode needs at least one reference image (imprompt encode REF... -o FILE)")
        if not self.output or Path(self.output).suffix not in SUFFIXES:
            raise ValueError(f"--output must name a {' or '.join(SUFFIXES)} file, got {self.output!r}")
        if self.adapter is None and self.image_encoder is None:
            raise ValueError("give --adapter (the embeds are made for it) or --image-encoder with --encoder-output")
        if self.adapter is None and self.encoder_output is None:
            raise ValueError("without --adapter, say which output to save: --encoder-output image_embeds (base "
                             "adapters) or penultimate_hidden (plus, full-face)")
        if not self.tiles and (self.tile_masks or self.enhance or self.tile_overlap or self.tile_sharpen):
            raise ValueError("--tile-masks, --enhance, --tile-overlap and --tile-sharpen go with --tiles")
        if self.tile_options is not None:
            self.tile_options.check()
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        pick_device(self.device)
        check_writable_folder(Path(self.output).parent, "--output's folder")


def run_encode(config: EncodeConfig, log: Callable[[str], None] = print) -> Path:
    """Check, read the references, load the adapter's variant and its encoder, encode, write."""
    from ..adapter.checkpoint import load_adapter
    from ..models.pairing import find_encoder

    config.check()
    roots = roots_from(config.models_dir)
    catalog = Catalog.scan(roots) if roots else None
    images = [load_image(p) for p in config.references]
    negatives = [load_image(p) for p in config.negative_image]
    variant, adapter_file = None, None
    if config.adapter is not None:
        adapter_file = resolve_file(resolve_name(config.adapter, "adapter", catalog) if catalog else config.adapter,
                                    "adapter")
        variant = load_adapter(adapter_file).variant
    if config.image_encoder is not None:
        name = resolve_name(config.image_encoder, "image_encoder", catalog) if catalog else config.image_encoder
        encoder_path = Path(name) if Path(name).is_file() else resolve_model(name, "image encoder")
    else:
        encoder_path = find_encoder(adapter_file, variant, catalog)
    encoder = ImageEncoder.load(encoder_path)
    encoder.model.to(pick_device(config.device))
    output = variant.encoder_output if variant is not None else config.encoder_output
    if variant is not None:
        from ..encoding import check_encoder

        check_encoder(variant, encoder)
        if config.encoder_output is not None and config.encoder_output != output:
            raise ValueError(f"--encoder-output {config.encoder_output} contradicts the {variant.name} adapter, which "
                             f"reads {output}; leave --encoder-output out")
    features = encode_references(images, encoder, output, config.crop, negatives or None, config.tile_options)
    if variant is not None:
        features.adapter = variant.name
    path = save_embeds(config.output, features)
    shape = "x".join(str(d) for d in features.conditional.shape)
    log(f"wrote {path}: {features.references} reference(s), {features.units} unit(s), {output} {shape}")
    return path
