"""imprompt: image prompts (IP-Adapter, Ye et al. 2023, arXiv 2308.06721) for Stable Diffusion 1.5 and SDXL.

The Python API, in data-flow order::

    adapter = load_adapter("ip-adapter_sd15.safetensors")           # official .bin / .safetensors
    encoder = ImageEncoder.from_pretrained("models/image_encoder")  # CLIP vision tower
    pipe = load_pipeline("runwayml/stable-diffusion-v1-5")          # diffusers pipeline
    with attach(pipe.unet, adapter) as attachment:                  # detaching restores the UNet
        images = generate(pipe, attachment, GenerationSettings(prompt="...", seed=1),
                          [ImagePrompt([reference], scale=0.6)], [encoder])
"""

from .adapter.attach import Attachment, adapter_for_unet, attach, cross_attention_layers
from .adapter.checkpoint import load_adapter, read_state, save_adapter
from .adapter.layers import PRESETS, LayerScales
from .adapter.model import IPAdapter
from .adapter.variants import AdapterVariant, CheckpointError, detect_variant
from .encoding import ImageEncoder, ImageInputError, load_image
from .generation.generate import generate
from .generation.settings import GenerationSettings
from .generation.pipelines import load_pipeline
from .generation.prompts import ImagePrompt

__version__ = "0.1.0"

__all__ = [
    "AdapterVariant", "Attachment", "CheckpointError", "GenerationSettings", "IPAdapter", "ImageEncoder",
    "ImageInputError", "ImagePrompt", "LayerScales", "PRESETS", "adapter_for_unet", "attach",
    "cross_attention_layers", "detect_variant", "generate", "load_adapter", "load_image", "load_pipeline",
    "read_state", "save_adapter",
]
