"""imprompt: image prompts (IP-Adapter, Ye et al. 2023, arXiv 2308.06721) for Stable Diffusion 1.5 and SDXL.

The Python API, in data-flow order::

    adapter = load_adapter("ip-adapter_sd15.safetensors")           # official .bin / .safetensors
    encoder = ImageEncoder.from_pretrained("models/image_encoder")  # CLIP vision tower
    pipe = load_pipeline("runwayml/stable-diffusion-v1-5")          # diffusers pipeline
    with attach(pipe.unet, adapter) as attachment:                  # detaching restores the UNet
        images = generate(pipe, attachment, GenerationSettings(prompt="...", seed=1),
                          [ImagePrompt([reference], scale=0.6)], [encoder])

The names are imported on first use (PEP 562), so that ``import imprompt.generation.pnginfo`` or
``imprompt info`` do not pay for torch, diffusers and transformers (seconds) when they need none.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "Attachment": ".adapter.attach", "adapter_for_unet": ".adapter.attach", "attach": ".adapter.attach",
    "cross_attention_layers": ".adapter.attach",
    "load_adapter": ".adapter.checkpoint", "read_state": ".adapter.checkpoint", "save_adapter": ".adapter.checkpoint",
    "PRESETS": ".adapter.layers", "LayerScales": ".adapter.layers",
    "IPAdapter": ".adapter.model",
    "AdapterVariant": ".adapter.variants", "CheckpointError": ".adapter.variants", "detect_variant": ".adapter.variants",
    "ImageEncoder": ".encoding", "ImageInputError": ".encoding", "load_image": ".encoding",
    "generate": ".generation.generate",
    "BatchItem": ".generation.batched", "generate_batch": ".generation.batched",
    "GenerationSettings": ".generation.settings",
    "load_pipeline": ".generation.pipelines",
    "ImagePrompt": ".generation.prompts",
    "TextDiff": ".generation.text_diff", "TextTower": ".generation.text_diff", "text_diff": ".generation.text_diff",
    "TuneOptions": ".training.tune", "tune": ".training.tune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imprompt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
