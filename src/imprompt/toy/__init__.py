"""The toy world: a small synthetic image domain where IP-Adapter runs for real on a CPU.

``shapes`` generates 32x32 images of one coloured shape on a plain background, with captions and
ground-truth attributes (including held-out shape/colour pairs); ``reader`` recovers those attributes
from any 32x32 image, and ``judge`` scores generations against what was asked (the evaluation reaches
the toy world through it). ``models`` holds the toy models' configurations; ``build`` (with ``config``,
``workdir``, ``loop``, ``stages``, ``adapter_stages``, ``package`` and ``card``) regenerates them,
``derivative`` fine-tunes a derived model, ``quality`` measures them; ``cli`` is ``imprompt toy``.
The built models ship in ``data/`` (:func:`toy_paths`).
"""

from pathlib import Path

PACKAGE_DIR = Path(__file__).parent / "data"


def toy_paths(package: Path | None = None) -> dict[str, Path]:
    """Where the shipped toy models live (standard folders; MODEL_CARD.md there says how they were made).

    The image encoder sits beside the adapter files, as in the official IP-Adapter layout, so an
    adapter finds it without ``--image-encoder`` (``default_encoder_path`` in generation/request.py).
    """
    package = package or PACKAGE_DIR
    return {"model": package / "pipeline", "adapter": package / "ip_adapter.safetensors",
            "image_encoder": package / "image_encoder", "references": package / "references",
            "clip": package / "clip", "simple_adapter": package / "simple_adapter.safetensors",
            "controlnet": package / "controlnet"}


def toy_available(package: Path | None = None) -> bool:
    return toy_paths(package)["adapter"].is_file()


def is_toy_model(model: str | None) -> bool:
    """Whether ``model`` names the shipped toy pipeline folder."""
    try:
        return model is not None and Path(model).resolve() == toy_paths()["model"].resolve()
    except OSError:
        return False
