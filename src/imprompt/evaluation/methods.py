"""The methods under evaluation, each as one way to turn (reference, text, seeds) into images.

* ``ip_adapter``: the decoupled adapter, attached to the UNet while the method runs, through
  :func:`imprompt.generate`.
* ``shared``: the paper's simple adapter (section 4.4.1), as ``imprompt train --variant shared`` makes it:
  its image tokens are appended to the text tokens of the frozen cross-attention. Its file holds only
  ``image_proj.*``; :func:`shared_prompt_embeds` is its whole generation path.
* ``text_only``, ``unconditional``: the pipeline as it is.
* ``img2img``: diffusers' img2img pipeline (sharing the text-to-image pipeline's components) with the
  reference as init image.
* ``reference_only``: the pipeline with A1111's Reference-only (:mod:`imprompt.generation.reference`), no
  adapter; an ``ip_adapter`` method with ``reference_mode`` runs Reference-only on top of its adapter.

Every method draws sample ``j`` from its own ``torch.Generator("cpu").manual_seed(seeds[j])``, so
a sample's noise does not depend on the method or on how many samples one call makes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image, ImageOps

from ..adapter.attach import attach
from ..adapter.checkpoint import load_shared_adapter, read_state
from ..adapter.model import IPAdapter
from ..adapter.variants import CheckpointError
from ..encoding import ImageEncoder, check_encoder
from ..generation.generate import GenerationSettings, generate
from ..generation.reference import ReferenceOptions
from ..generation.pipelines import ModelNotFoundError, resolve_file, resolve_model
from ..models.catalog import Catalog
from ..models.pairing import find_encoder, fits
from .config import MethodSpec

# (reference, text, seeds, ip_adapter scale or None) -> one image per seed
Sampler = Callable[[Image.Image, str, Sequence[int], "float | None"], list[Image.Image]]


@dataclass
class Sampling:
    """What every method shares: steps, guidance, and the model's output size."""

    steps: int
    guidance: float
    size: int  # square output side in pixels (the model's default)


@dataclass
class MethodModels:
    spec: MethodSpec
    adapter: IPAdapter | None = None
    encoder: ImageEncoder | None = None
    adapter_file: Path | None = None
    encoder_dir: Path | None = None


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _encoder_path(spec: MethodSpec, adapter_file: Path, variant, model: str, catalog: Catalog | None) -> Path:
    """The method's image_encoder (a folder, hub id or single file), else the one the adapter needs:
    beside it as the official repo keeps it, in the model folder, or among the catalog's encoders."""
    if spec.image_encoder:
        if Path(spec.image_encoder).is_file():
            return Path(spec.image_encoder)
        return resolve_model(spec.image_encoder, "image encoder")
    try:
        return find_encoder(adapter_file, variant)  # beside the adapter, as the official repo keeps it
    except CheckpointError:
        pass
    inside = Path(model) / "image_encoder"
    if (inside / "config.json").is_file() and fits(inside, variant) is not False:
        return inside
    try:
        return find_encoder(adapter_file, variant, catalog)
    except CheckpointError as err:
        raise ModelNotFoundError(f"method {spec.name!r}: {err} (or set image_encoder=PATH)") from None


def load_method(spec: MethodSpec, model: str, dtype: torch.dtype, device: str | torch.device,
                catalog: Catalog | None = None) -> MethodModels:
    """Read and check an adapter method's adapter and image encoder (baselines need nothing)."""
    if spec.kind not in ("ip_adapter", "shared"):
        return MethodModels(spec)
    try:
        adapter_file = resolve_file(spec.adapter)
    except ModelNotFoundError as err:
        raise ModelNotFoundError(f"method {spec.name!r}: adapter {err}") from None
    if spec.kind == "ip_adapter":
        state = read_state(adapter_file)
        if all(k.startswith("image_proj.") for k in state):
            raise CheckpointError(f"method {spec.name!r}: {adapter_file.name} holds only image_proj weights, as a "
                                  "shared (simple) adapter does; use kind: shared")
        adapter = IPAdapter.from_state_dict(state).to(dtype)  # what load_adapter does, without reading twice
    else:
        adapter = load_shared_adapter(adapter_file, dtype)
    encoder_dir = _encoder_path(spec, adapter_file, adapter.variant, model, catalog)
    encoder = ImageEncoder.load(encoder_dir, dtype)
    encoder.model.to(device)
    check_encoder(adapter.variant, encoder)
    return MethodModels(spec, adapter.to(device), encoder, adapter_file, encoder_dir)


def init_image(reference: Image.Image, size: int) -> Image.Image:
    """The reference as an img2img start image: centre-cropped square at the model's size."""
    image = reference.convert("RGB")
    return image if image.size == (size, size) else ImageOps.fit(image, (size, size), Image.BICUBIC)


def _settings(sampling: Sampling, prompt: str, seeds: Sequence[int], guidance: float | None = None,
              strength: float = 0.8, image_guidance: float | None = None) -> GenerationSettings:
    # One generator per image through ``extra`` (passed to the pipeline as is); ``seed`` stays None.
    return GenerationSettings(prompt=prompt, steps=sampling.steps, num_images=len(seeds), strength=strength,
                              guidance=sampling.guidance if guidance is None else guidance,
                              image_guidance=image_guidance, extra={"generator": generators(seeds)})


@torch.no_grad()
def shared_prompt_embeds(pipe, adapter: IPAdapter, encoder: ImageEncoder, reference: Image.Image, prompt: str,
                         negative_prompt: str = "") -> dict[str, torch.Tensor]:
    """The shared adapter's conditioning: text tokens + image tokens, for one reference.

    As in training (:class:`imprompt.training.trainer.TrainingModel`): the projected image features are
    appended to the prompt's text states, and the projected *unconditional* image features (what the
    adapter saw when the image was dropped) to the negative prompt's, so classifier-free guidance
    contrasts image + text with neither. Returns the diffusers pipeline's ``prompt_embeds`` /
    ``negative_prompt_embeds`` (and SDXL's pooled embeddings), batch 1.
    """
    output = adapter.variant.encoder_output
    pixels = encoder.pixels([reference])
    features = torch.cat([encoder.unconditional(pixels, output), encoder.features(pixels, output)])
    image_uncond, image_cond = adapter.project(features).chunk(2)
    text = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1,
                              do_classifier_free_guidance=True, negative_prompt=negative_prompt or None)
    embeds = {
        "prompt_embeds": torch.cat([text[0], image_cond.to(text[0])], dim=1),
        "negative_prompt_embeds": torch.cat([text[1], image_uncond.to(text[1])], dim=1),
    }
    if len(text) == 4:  # SDXL: pooled text embeddings are not touched by the adapter
        embeds.update(pooled_prompt_embeds=text[2], negative_pooled_prompt_embeds=text[3])
    return embeds


def _reference(spec: MethodSpec, image: Image.Image) -> ReferenceOptions | None:
    if spec.reference is None:
        return None
    mode, fidelity = spec.reference
    return ReferenceOptions(image, mode, fidelity)


@contextmanager
def open_method(models: MethodModels, pipe, img2img_pipe, sampling: Sampling) -> Iterator[Sampler]:
    """A sampler for the method; an ip_adapter stays attached to the UNet until the block ends."""
    spec = models.spec
    if spec.kind == "ip_adapter":
        from ..generation.prompts import ImagePrompt

        with attach(pipe.unet, models.adapter) as attachment:
            def ip_adapter(reference, text, seeds, scale):
                prompt = ImagePrompt([reference], scale=spec.ip_scale if scale is None else scale,
                                     layers=spec.prompt_layers)
                settings = _settings(sampling, text, seeds, guidance=spec.guidance, image_guidance=spec.image_guidance)
                return generate(pipe, attachment, settings, [prompt], [models.encoder],
                                reference=_reference(spec, reference))
            yield ip_adapter
        return

    if spec.kind == "shared":
        def shared(reference, text, seeds, scale):
            embeds = shared_prompt_embeds(pipe, models.adapter, models.encoder, reference, text)
            with torch.no_grad():
                return pipe(**embeds, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance,
                            num_images_per_prompt=len(seeds), generator=generators(seeds)).images
        yield shared
    elif spec.kind == "img2img":
        def img2img(reference, text, seeds, scale):
            # With an empty text both guidance branches see the same conditioning (see unconditional).
            settings = _settings(sampling, text, seeds, guidance=None if text else 1.0, strength=spec.init_strength)
            return generate(img2img_pipe, None, settings, init_image=init_image(reference, sampling.size))
        yield img2img
    elif spec.kind == "reference_only":
        def reference_only(reference, text, seeds, scale):
            return generate(pipe, None, _settings(sampling, text, seeds), reference=_reference(spec, reference))
        yield reference_only
    elif spec.kind == "text_only":
        def text_only(reference, text, seeds, scale):
            return generate(pipe, None, _settings(sampling, text, seeds))
        yield text_only
    elif spec.kind == "unconditional":
        def unconditional(reference, text, seeds, scale):
            # Guidance off: with an empty prompt (and empty negative) the guided prediction equals the
            # unconditional one, so guidance would only double the cost.
            return generate(pipe, None, _settings(sampling, "", seeds, guidance=1.0))
        yield unconditional
    else:
        raise ValueError(f"method {spec.name!r}: unknown kind {spec.kind!r}")
