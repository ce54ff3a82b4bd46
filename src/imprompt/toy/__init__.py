"""The toy world: a small synthetic image domain where IP-Adapter runs for real on a CPU.

``shapes`` generates 32x32 images of one coloured shape on a plain background, with captions and
ground-truth attributes (including held-out shape/colour pairs); ``reader`` recovers those attributes
from any 32x32 image, so generated images can be scored against their prompts.
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).parent / "data"


def toy_paths(package: Path | None = None) -> dict[str, Path]:
    """Where the shipped toy models live (standard folders; MODEL_CARD.md there says how they were made)."""
    package = package or PACKAGE_DIR
    return {"model": package / "pipeline", "adapter": package / "ip_adapter.safetensors",
            "image_encoder": package / "pipeline" / "image_encoder", "references": package / "references",
            "clip": package / "clip", "simple_adapter": package / "simple_adapter.safetensors"}


def toy_available(package: Path | None = None) -> bool:
    return toy_paths(package)["adapter"].is_file()

