"""ControlNet preprocessors: an image in, the control map a ControlNet was trained on out.

Each preprocessor is a pure function ``(pixels, params) -> pixels`` on uint8 H x W x 3 arrays; the registry
:data:`PREPROCESSORS` maps the ControlNet extension's module names (sd-webui-controlnet's
``preprocessor`` list: "canny", "scribble_xdog", "tile_resample", ...) to them, with the meaning and
default of its two thresholds (the extension's ``threshold_a`` / ``threshold_b`` sliders) and of its
processor resolution (``processor_res``: the short side the image is resized to before detection; -1 or
0 keeps the size).

Computed here without model weights (OpenCV and numpy):

* ``canny``: OpenCV's Canny edge detector, thresholds a (low, default 100) and b (high, default 200).
* ``lineart_standard`` (the extension's weight-free "lineart_standard (from white bg & black line)"):
  how much darker each pixel is than its Gaussian blur (sigma 6), the least over the channels, scaled by
  the median of the clear responses: a difference-of-Gaussians line drawing, dark strokes -> white lines.
* ``scribble_xdog``: the extension's XDoG scribble: the difference of Gaussian blurs at sigma 0.5 and 5,
  thresholded at a (default 32): thick binary white strokes where the image has edges.
* ``softedge_sobel`` (imprompt's own name, no model): the Sobel gradient magnitude of the grey image,
  scaled to 0..255: soft edges, brighter where the image changes faster (the model-based
  ``softedge_hed`` / ``softedge_pidinet`` give smoother, more semantic edges).
* ``shuffle``: the extension's content shuffle: the image warped by a random smooth flow field (noise at
  a coarse grid, ``f`` = 256 px, upsampled bicubically), seeded, so a seed gives the same shuffle.
* ``tile_resample``: downsampled by a (default 1: unchanged; 2 = half size), area-averaged: the tile
  ControlNet's blurred input. ``blur_gaussian``: a Gaussian blur of sigma a (default 9).
* ``invert``: 255 - pixels (a black-on-white drawing as the white-on-black lines line ControlNets read).
* ``none``: the image as it is.
* ``toy_silhouette`` (imprompt's own): the shape the toy world's reader sees in a 32x32 toy image, as
  a white silhouette on black, the toy ControlNet's control map.

Depth, pose, segmentation, HED and the other model-based preprocessors run through the ``controlnet_aux``
package and its annotator weights (``lllyasviel/Annotators``) when both are installed; otherwise they are
refused with the message to install them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

Pixels = np.ndarray  # uint8, H x W x 3


@dataclass(frozen=True)
class Params:
    """What a preprocessor is given: its two thresholds (already defaulted) and the seed (shuffle)."""

    a: float
    b: float
    seed: int = 0


@dataclass(frozen=True)
class Preprocessor:
    """A registry entry: the function, what its thresholds mean and default to (None: not used)."""

    run: Callable[[Pixels, Params], Pixels] | None  # None: model-based, through controlnet_aux
    a: tuple[str, float] | None = None  # (name, default) of threshold_a
    b: tuple[str, float] | None = None
    aux: str | None = None  # the controlnet_aux detector class, for the model-based ones


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("ControlNet preprocessors need OpenCV: pip install opencv-python-headless") from None
    return cv2


def canny(pixels: Pixels, params: Params) -> Pixels:
    """cv2.Canny with low = a, high = b (Canny 1986; the extension passes them as they are)."""
    edges = _cv2().Canny(pixels, params.a, params.b)
    return np.repeat(edges[:, :, None], 3, axis=2)


def lineart_standard(pixels: Pixels, params: Params) -> Pixels:
    """How much darker than its surroundings (Gaussian sigma 6) each pixel is, over the channels the least,
    divided by the median clear response (at least 16) and scaled by 127: dark lines become white ones."""
    x = pixels.astype(np.float32)
    blurred = _cv2().GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    clear = intensity[intensity > 8]
    intensity = intensity / max(16.0, float(np.median(clear)) if clear.size else 16.0) * 127
    return np.repeat(intensity.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def scribble_xdog(pixels: Pixels, params: Params) -> Pixels:
    """The extension's XDoG: white where twice the (clipped) smallest channel difference of the Gaussian blurs
    at sigma 5 and 0.5 exceeds threshold a."""
    cv2 = _cv2()
    x = pixels.astype(np.float32)
    difference = np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2)
    dog = (255 - difference).clip(0, 255).astype(np.uint8)  # through uint8 (truncating) as the extension does
    out = np.zeros_like(pixels)
    out[2 * (255 - dog.astype(np.int32)) > params.a] = 255
    return out


def softedge_sobel(pixels: Pixels, params: Params) -> Pixels:
    """The Sobel gradient magnitude of the grey image, scaled so that the strongest edge is 255."""
    cv2 = _cv2()
    grey = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY).astype(np.float32)
    magnitude = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
    peak = float(magnitude.max())
    scaled = magnitude / peak * 255 if peak > 0 else magnitude
    return np.repeat(scaled.round().astype(np.uint8)[:, :, None], 3, axis=2)


def _noise_disk(height: int, width: int, channels: int, grid: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise in [0, 1]: uniform noise on a grid of ``grid`` pixels, upsampled bicubically (the
    extension's ``make_noise_disk``)."""
    noise = rng.uniform(0, 1, size=(math.ceil(height / grid) + 2 * grid, math.ceil(width / grid) + 2 * grid,
                                    channels)).astype(np.float32)
    noise = _cv2().resize(noise, (width + 2 * grid, height + 2 * grid), interpolation=_cv2().INTER_CUBIC)
    noise = noise.reshape(height + 2 * grid, width + 2 * grid, channels)[grid:grid + height, grid:grid + width]
    noise = noise - noise.min()
    return noise / max(float(noise.max()), 1e-12)


def shuffle(pixels: Pixels, params: Params) -> Pixels:
    """Content shuffle: each pixel is read from where a random smooth flow field points (x and y noise
    disks of grid 256 px spanning the image), seeded by ``params.seed``."""
    cv2 = _cv2()
    height, width = pixels.shape[:2]
    rng = np.random.default_rng(params.seed)
    x = _noise_disk(height, width, 1, 256, rng) * float(width - 1)
    y = _noise_disk(height, width, 1, 256, rng) * float(height - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(pixels, flow, None, cv2.INTER_LINEAR)


def tile_resample(pixels: Pixels, params: Params) -> Pixels:
    """Downsampled by the rate a (area averaging); rates below 1.1 leave the image as it is (as the
    extension does)."""
    if params.a < 1.1:
        return pixels
    height, width = pixels.shape[:2]
    size = (max(1, int(width / params.a)), max(1, int(height / params.a)))
    return _cv2().resize(pixels, size, interpolation=_cv2().INTER_AREA)


def blur_gaussian(pixels: Pixels, params: Params) -> Pixels:
    """A Gaussian blur of sigma a."""
    return _cv2().GaussianBlur(pixels, (0, 0), params.a)


def invert(pixels: Pixels, params: Params) -> Pixels:
    return 255 - pixels


def identity(pixels: Pixels, params: Params) -> Pixels:
    return pixels


def toy_silhouette(pixels: Pixels, params: Params) -> Pixels:
    """The toy world's attribute reader's shape, redrawn as a white silhouette on black: the bundled toy
    ControlNet's control map (:func:`imprompt.toy.reader.silhouette_of`; 32x32 toy images only)."""
    from ..toy.reader import silhouette_of  # numpy only, but not needed by anything else here

    return np.asarray(silhouette_of(pixels))


_MODEL = "controlnet_aux"
PREPROCESSORS: dict[str, Preprocessor] = {
    "none": Preprocessor(identity),
    "canny": Preprocessor(canny, ("low threshold", 100), ("high threshold", 200)),
    "lineart_standard": Preprocessor(lineart_standard),
    "scribble_xdog": Preprocessor(scribble_xdog, ("XDoG threshold", 32)),
    "softedge_sobel": Preprocessor(softedge_sobel),
    "shuffle": Preprocessor(shuffle),
    "tile_resample": Preprocessor(tile_resample, ("down sampling rate", 1.0)),
    "blur_gaussian": Preprocessor(blur_gaussian, ("sigma", 9.0)),
    "invert": Preprocessor(invert),
    "toy_silhouette": Preprocessor(toy_silhouette),
    # Model-based: controlnet_aux's detectors and the lllyasviel/Annotators weights.
    "lineart": Preprocessor(None, aux="LineartDetector"),
    "lineart_anime": Preprocessor(None, aux="LineartAnimeDetector"),
    "depth": Preprocessor(None, aux="MidasDetector"),
    "depth_midas": Preprocessor(None, aux="MidasDetector"),
    "depth_zoe": Preprocessor(None, aux="ZoeDetector"),
    "normal_bae": Preprocessor(None, aux="NormalBaeDetector"),
    "openpose": Preprocessor(None, aux="OpenposeDetector"),
    "openpose_full": Preprocessor(None, aux="OpenposeDetector"),
    "softedge_hed": Preprocessor(None, aux="HEDdetector"),
    "softedge_pidinet": Preprocessor(None, aux="PidiNetDetector"),
    "scribble_hed": Preprocessor(None, aux="HEDdetector"),
    "scribble_pidinet": Preprocessor(None, aux="PidiNetDetector"),
    "mlsd": Preprocessor(None, aux="MLSDdetector"),
    "seg_ofade20k": Preprocessor(None, aux="OneformerSegmentor"),
}
# The extension's other spellings of the same modules.
ALIASES = {"lineart_realistic": "lineart", "hed": "softedge_hed", "pidinet": "softedge_pidinet",
           "midas": "depth_midas", "segmentation": "seg_ofade20k", "normal_map": "normal_bae",
           "pidinet_scribble": "scribble_pidinet", "fake_scribble": "scribble_hed", "tile": "tile_resample",
           "blur": "blur_gaussian", "invert (from white bg & black line)": "invert",
           "lineart_standard (from white bg & black line)": "lineart_standard"}


def module_key(name: str) -> str:
    """The registry key of a module name (any case, the extension's aliases); ValueError naming the known
    ones for another."""
    key = (name or "none").strip().lower()
    key = ALIASES.get(key, key)
    if key not in PREPROCESSORS:
        raise ValueError(f"unknown ControlNet preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}")
    return key


def aux_missing_message(key: str) -> str:
    entry = PREPROCESSORS[key]
    return (f"the {key} preprocessor runs the {entry.aux} model of controlnet_aux: pip install controlnet_aux, "
            "and have its annotator weights (lllyasviel/Annotators on the Hugging Face hub) in the hub cache; "
            "or give an already-preprocessed control image with --control-preprocess none")


def check_available(key: str) -> None:
    """Raise ImportError with the install message for a model-based preprocessor without controlnet_aux."""
    if PREPROCESSORS[key].run is None:
        try:
            import controlnet_aux  # noqa: F401
        except ImportError:
            raise ImportError(aux_missing_message(key)) from None


def resize_short_side(pixels: Pixels, resolution: int | None) -> Pixels:
    """The image with its short side ``resolution`` px (the extension's processor resolution; its
    rounding to multiples of 64 is not copied: the pipeline resizes the map to the output anyway).
    None or <= 0: unchanged."""
    if not resolution or resolution <= 0:
        return pixels
    height, width = pixels.shape[:2]
    k = resolution / min(height, width)
    size = (max(1, round(width * k)), max(1, round(height * k)))
    if size == (width, height):
        return pixels
    cv2 = _cv2()
    return cv2.resize(pixels, size, interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def preprocess(image: Image.Image, module: str, resolution: int | None = None, threshold_a: float | None = None,
               threshold_b: float | None = None, seed: int = 0) -> Image.Image:
    """The control map of ``image`` by the preprocessor ``module``. Thresholds None (or the extension's -1):
    the module's defaults."""
    key = module_key(module)
    entry = PREPROCESSORS[key]
    if key == "none":
        return image
    check_available(key)
    pixels = resize_short_side(np.asarray(image.convert("RGB")), resolution)
    if entry.run is None:
        return _run_aux(key, Image.fromarray(pixels))
    a = entry.a[1] if entry.a and (threshold_a is None or threshold_a < 0) else threshold_a
    b = entry.b[1] if entry.b and (threshold_b is None or threshold_b < 0) else threshold_b
    params = Params(float(a) if a is not None else 0.0, float(b) if b is not None else 0.0, seed)
    return Image.fromarray(np.ascontiguousarray(entry.run(pixels, params)), "RGB")


def _run_aux(key: str, image: Image.Image) -> Image.Image:  # pragma: no cover - needs controlnet_aux and weights
    import controlnet_aux

    detector_class = getattr(controlnet_aux, PREPROCESSORS[key].aux)
    try:
        detector = detector_class.from_pretrained("lllyasviel/Annotators")
    except TypeError:
        detector = detector_class()
    except OSError as err:
        raise ImportError(f"{aux_missing_message(key)} ({err})") from None
    # Detect at the size given (the processor resolution was applied above), not controlnet_aux's 512.
    side = min(image.size)
    kwargs = {"scribble": True} if key.startswith("scribble_") else {}
    return detector(image, detect_resolution=side, image_resolution=side, **kwargs).convert("RGB")
