"""Per-ControlNet options of a request: strings in, one typed and checked :class:`ControlOptions` per
``--controlnet`` out, before anything is read or loaded.

Several ControlNets run at once as diffusers' ``MultiControlNetModel``: each has its control image, its
conditioning scale and the fraction of the steps it acts in (diffusers' ``control_guidance_start`` /
``control_guidance_end``, the ControlNet extension's guidance start / end), and its preprocessor
(:mod:`imprompt.generation.preprocess`) with the processor resolution and thresholds.

Values are ``VALUE`` (every ControlNet not named otherwise) or ``N=VALUE`` (ControlNet N, 0-based in
``--controlnet`` order), as the per-adapter options are. Control images are ``N=PATH``, or plain ``PATH``
s taken by the ControlNets in order (one ``--control-image`` for one ``--controlnet`` stays as it was).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from .adapter_options import finite, fraction, split_target
from .preprocess import PREPROCESSORS, check_available, module_key, preprocess

if TYPE_CHECKING:
    from PIL import Image

    from .request import GenerateRequest

T = TypeVar("T")
MAX_CONTROL_SCALE = 100.0  # ControlNet scales are 0 to 2 in practice; beyond this only overflows
MAX_RESOLUTION = 8192


@dataclass(frozen=True)
class ControlOptions:
    """One ``--controlnet`` and everything given for it, parsed and checked."""

    index: int
    file: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"  # a key of imprompt.generation.preprocess.PREPROCESSORS
    resolution: int | None = None  # the short side before preprocessing; None: as given
    threshold_a: float | None = None  # None: the preprocessor's default
    threshold_b: float | None = None

    def thresholds(self) -> tuple[float | None, float | None]:
        """The thresholds that act (the preprocessor's defaults filled in; None where it has none)."""
        entry = PREPROCESSORS[self.preprocess]
        a = (self.threshold_a if self.threshold_a is not None else entry.a[1]) if entry.a else None
        b = (self.threshold_b if self.threshold_b is not None else entry.b[1]) if entry.b else None
        return a, b

    def describe(self, model_name: str) -> str:
        """The PNG info of this ControlNet, in the extension's ``ControlNet N`` words."""
        a, b = self.thresholds()
        parts = {
            "Module": self.preprocess, "Model": model_name, "Weight": f"{self.scale:g}",
            "Image": Path(self.image).name,
            "Processor Res": self.resolution if self.preprocess != "none" and self.resolution else None,
            "Threshold A": f"{a:g}" if a is not None else None, "Threshold B": f"{b:g}" if b is not None else None,
            "Guidance Start": f"{self.start:g}", "Guidance End": f"{self.end:g}",
        }
        return ", ".join(f"{k}: {v}" for k, v in parts.items() if v is not None)

    def control_map(self, image: "Image.Image", seed: int = 0) -> "Image.Image":
        """This ControlNet's conditioning image: ``image`` through its preprocessor."""
        return preprocess(image, self.preprocess, self.resolution, self.threshold_a, self.threshold_b, seed)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def per_controlnet(values: Sequence[str], count: int, convert: Callable[[str], T], default: T, name: str) -> list[T]:
    """One value per ControlNet from 'VALUE' (every ControlNet not named otherwise) and 'N=VALUE'."""
    parsed = []
    for raw in values:  # every value checked first, so a typo is named even without --controlnet
        index, text = split_target(str(raw))
        try:
            parsed.append((raw, index, convert(text.strip())))
        except ValueError as err:
            raise ValueError(f"{_flag(name)} {raw!r}: {err}") from None
    if values and not count:
        raise ValueError(f"{_flag(name)} applies to a ControlNet, but no --controlnet was given")
    out = [default] * count
    targeted: set[int] = set()
    for raw, index, value in parsed:
        if index is None:
            out = [value if i not in targeted else out[i] for i in range(count)]
        elif index >= count:
            raise ValueError(f"{_flag(name)} {raw!r} names ControlNet {index}, but {count} --controlnet were given")
        else:
            out[index] = value
            targeted.add(index)
    return out


def control_images(values: Sequence[str], count: int) -> list[str]:
    """One image per ControlNet: 'N=PATH' for ControlNet N, plain PATHs to the others in order."""
    out: list[str | None] = [None] * count
    plain = []
    for raw in values:
        index, text = split_target(raw)
        if index is None:
            plain.append(text)
        elif index >= count:
            raise ValueError(f"--control-image {raw!r} names ControlNet {index}, but {count} --controlnet were given")
        elif out[index] is not None:
            raise ValueError(f"--control-image: ControlNet {index} has two images; give one each")
        else:
            out[index] = text
    free = [i for i in range(count) if out[i] is None]
    if len(plain) != len(free):
        raise ValueError(f"{count} --controlnet need one --control-image each (N=PATH for ControlNet N); "
                         f"found {count - len(free)} targeted and {len(plain)} plain image(s) for {len(free)} "
                         "ControlNet(s) without one")
    for i, path in zip(free, plain):
        out[i] = path
    return [p for p in out if p is not None]


def _scale(text: str) -> float:
    try:
        value = finite(text)
    except ValueError:
        raise ValueError(f"controlnet_scale must be a finite number, got {text!r}") from None
    if abs(value) > MAX_CONTROL_SCALE:
        raise ValueError(f"a ControlNet scale beyond +-{MAX_CONTROL_SCALE:g} only overflows (typically 0 to 2)")
    return value


def _module(text: str) -> str:
    key = module_key(text)
    try:  # a model-based one without controlnet_aux fails now, not after the model loads
        check_available(key)
    except ImportError as err:
        raise ValueError(str(err)) from None
    return key


def _resolution(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number of pixels (-1: as given)") from None
    if value > MAX_RESOLUTION:
        raise ValueError(f"expected at most {MAX_RESOLUTION} pixels")
    return value if value > 0 else None


def _threshold(text: str) -> float | None:
    value = finite(text)
    return None if value < 0 else value  # the extension's -1: the preprocessor's default


def control_options(request: "GenerateRequest") -> list[ControlOptions]:
    """The request's ControlNets, each with its image, scale, steps and preprocessor; raises ValueError
    naming the flag for a bad value."""
    count = len(request.controlnet)
    if request.control_image and not count:
        raise ValueError("--control-image needs a --controlnet to read it")
    if count and not request.control_image:
        raise ValueError("--controlnet needs a --control-image")
    images = control_images(request.control_image, count)
    scales = per_controlnet(request.controlnet_scale, count, _scale, 1.0, "controlnet_scale")
    starts = per_controlnet(request.control_start, count, fraction, 0.0, "control_start")
    ends = per_controlnet(request.control_end, count, fraction, 1.0, "control_end")
    modules = per_controlnet(request.control_preprocess, count, _module, "none", "control_preprocess")
    resolutions = per_controlnet(request.control_res, count, _resolution, None, "control_res")
    thresholds_a = per_controlnet(request.control_threshold_a, count, _threshold, None, "control_threshold_a")
    thresholds_b = per_controlnet(request.control_threshold_b, count, _threshold, None, "control_threshold_b")
    out = []
    for i in range(count):
        if starts[i] >= ends[i]:
            raise ValueError(f"ControlNet {i}: --control-start {starts[i]:g} must be below --control-end {ends[i]:g}")
        out.append(ControlOptions(i, request.controlnet[i], images[i], scales[i], starts[i], ends[i], modules[i],
                                  resolutions[i], thresholds_a[i], thresholds_b[i]))
    return out


def request_values(controls: Sequence[ControlOptions]) -> dict[str, list[str]]:
    """The GenerateRequest fields (``N=VALUE`` strings) of ControlNets given as options, as the servers'
    payloads give them: the inverse of :func:`control_options`. Unset resolution / thresholds (None or
    negative, the extension's -1) are left out, so the preprocessor's defaults act."""
    values: dict[str, list[str]] = {k: [] for k in ("controlnet", "control_image", "controlnet_scale", "control_start",
                                                    "control_end", "control_preprocess", "control_res",
                                                    "control_threshold_a", "control_threshold_b")}
    for n, c in enumerate(controls):
        values["controlnet"].append(c.file)
        values["control_image"].append(f"{n}={c.image}")
        values["controlnet_scale"].append(f"{n}={float(c.scale)!r}")
        values["control_start"].append(f"{n}={float(c.start)!r}")
        values["control_end"].append(f"{n}={float(c.end)!r}")
        values["control_preprocess"].append(f"{n}={c.preprocess or 'none'}")
        if c.resolution is not None and int(c.resolution) > 0:
            values["control_res"].append(f"{n}={int(c.resolution)}")
        for name, value in (("control_threshold_a", c.threshold_a), ("control_threshold_b", c.threshold_b)):
            if value is not None and float(value) >= 0:
                values[name].append(f"{n}={float(value)!r}")
    return values


def as_call_value(values: Sequence[T]) -> T | list[T]:
    """A value per ControlNet as diffusers takes it: a list for several, the value itself for one."""
    return values[0] if len(values) == 1 else list(values)
