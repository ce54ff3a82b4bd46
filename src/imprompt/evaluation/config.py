"""The evaluation configuration: a typed dataclass read from YAML, every field also a CLI flag.

A method is data, :class:`MethodSpec`: a name, a kind, and the few options its kind takes. In YAML a
list of mappings; on the command line ``--method NAME:KIND[:key=value,...]``, e.g.
``--method ip:ip_adapter:adapter=models/ip-adapter_sd15.safetensors,scale=0.6``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import load_config as _load_config, option as _m

from ..generation.request import DTYPES as TORCH_DTYPES
from ..generation.schedulers import SCHEDULERS

KINDS: tuple[str, ...] = ("ip_adapter", "shared", "text_only", "unconditional", "img2img", "reference_only")
ADAPTER_KINDS: tuple[str, ...] = ("ip_adapter", "shared")
DEFAULT_SCALE = 1.0  # image alone, as the paper's Table 1 and the toy world's image-only target
DEFAULT_STRENGTH = 0.7  # img2img: how much of the reference is re-noised
DEFAULT_FIDELITY = 0.5  # reference_only: the extension's default style fidelity
REFERENCE_TAKERS = ("reference_only", "ip_adapter")  # kinds that run Reference-only (ip_adapter: on top)
DTYPES: tuple[str, ...] = ("auto", *TORCH_DTYPES)
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


@dataclass
class MethodSpec:
    """One row of the report: an adapter or a baseline, with its settings."""

    name: str
    kind: str
    adapter: str = ""  # ip_adapter / shared: the checkpoint (a local file or org/repo/path on the hub)
    image_encoder: str = ""  # default: image_encoder/ beside the adapter file, else <model>/image_encoder
    scale: float | None = None  # ip_adapter only (default 1.0)
    strength: float | None = None  # img2img only (default 0.7)
    # reference_only: the mode (default reference_only); ip_adapter: Reference-only on top when set
    reference_mode: str = ""
    style_fidelity: float | None = None  # with reference_mode / kind reference_only (default 0.5)
    # ip_adapter only: per-layer image-prompt weights (ImagePrompt.layers; on the command line ';' between
    # blocks, as the commas separate options), this method's own text guidance (default: the run's), and
    # the image prompts' own guidance scale (imprompt.generation.image_guidance; default: one scale)
    layers: str = ""
    guidance: float | None = None
    image_guidance: float | None = None

    @property
    def prompt_layers(self) -> str | None:
        """``layers`` as ``ImagePrompt.layers`` takes it (the command line's ';' back to ',')."""
        return self.layers.replace(";", ",") or None

    @property
    def ip_scale(self) -> float:
        return DEFAULT_SCALE if self.scale is None else float(self.scale)

    @property
    def reference(self) -> tuple[str, float] | None:
        """(mode, style fidelity) of the Reference-only this method runs, or None."""
        if self.kind != "reference_only" and not self.reference_mode:
            return None
        return (self.reference_mode or "reference_only",
                DEFAULT_FIDELITY if self.style_fidelity is None else float(self.style_fidelity))

    @property
    def init_strength(self) -> float:
        return DEFAULT_STRENGTH if self.strength is None else float(self.strength)

    def check(self) -> None:
        where = f"method {self.name!r}"
        if not self.name or not _NAME.match(self.name):
            raise ValueError(f"{where}: a method name may use letters, digits and _ . + - (it names report rows and files)")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind in ADAPTER_KINDS and not self.adapter:
            raise ValueError(f"{where} (kind {self.kind}) needs an adapter file: adapter=PATH")
        if self.kind not in ADAPTER_KINDS:
            for name in ("adapter", "image_encoder"):
                if getattr(self, name):
                    raise ValueError(f"{where}: kind {self.kind} takes no {name} (only {' and '.join(ADAPTER_KINDS)} do)")
        if self.scale is not None and self.kind != "ip_adapter":
            why = " (the shared adapter has no scale: its tokens join the text tokens)" if self.kind == "shared" else ""
            raise ValueError(f"{where}: scale applies to ip_adapter methods only{why}")
        if self.strength is not None:
            if self.kind != "img2img":
                raise ValueError(f"{where}: strength applies to img2img methods only")
            if not 0.0 < float(self.strength) <= 1.0:
                raise ValueError(f"{where}: strength must be in (0, 1], got {self.strength}")
        if (self.reference_mode or self.style_fidelity is not None) and self.kind not in REFERENCE_TAKERS:
            raise ValueError(f"{where}: reference_mode / style_fidelity apply to {' and '.join(REFERENCE_TAKERS)} "
                             "methods only")
        if self.style_fidelity is not None and self.kind == "ip_adapter" and not self.reference_mode:
            raise ValueError(f"{where}: style_fidelity on an ip_adapter method needs reference_mode (Reference-only "
                             "on top of the adapter)")
        for name in ("layers", "guidance", "image_guidance"):
            if getattr(self, name) not in ("", None) and self.kind != "ip_adapter":
                raise ValueError(f"{where}: {name} applies to ip_adapter methods only")
        if self.reference is not None:
            from ..generation.reference import ReferenceOptions

            ReferenceOptions(None, *self.reference).check()

    def describe(self) -> str:
        """The settings that make this row what it is, for the report."""
        parts = [self.kind]
        if self.kind == "ip_adapter":
            parts.append(f"scale {self.ip_scale:g}")
            if self.layers:
                parts.append(f"layers {self.layers}")
            if self.guidance is not None:
                parts.append(f"guidance {self.guidance:g}")
            if self.image_guidance is not None:
                parts.append(f"image guidance {self.image_guidance:g}")
        if self.kind == "img2img":
            parts.append(f"strength {self.init_strength:g}")
        if self.reference is not None:
            parts.append(f"{self.reference[0]}, style fidelity {self.reference[1]:g}")
        if self.adapter:
            parts.append(Path(self.adapter).name)
        return ", ".join(parts)


def parse_method(text: str) -> MethodSpec:
    """``NAME:KIND[:key=value,...]`` -> MethodSpec (keys: adapter, image_encoder, scale, strength,
    reference_mode, style_fidelity, layers, guidance, image_guidance)."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"--method {text!r}: expected NAME:KIND[:key=value,...], e.g. ip:ip_adapter:adapter=ip.safetensors,scale=0.6")
    values: dict[str, Any] = {"name": parts[0], "kind": parts[1]}
    for item in (parts[2].split(",") if len(parts) == 3 and parts[2] else []):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--method {text!r}: option {item!r} is not key=value")
        values[key.strip()] = value.strip()
    return method_from_mapping(values, f"--method {text!r}")


def method_from_mapping(values: dict[str, Any], where: str) -> MethodSpec:
    known = [f.name for f in dataclasses.fields(MethodSpec)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown method option(s) {unknown}; known: {', '.join(known)}")
    for name in ("name", "kind"):
        if not values.get(name):
            raise ValueError(f"{where}: a method needs a {name}")
    converted = dict(values)
    for name in ("scale", "strength", "style_fidelity", "guidance", "image_guidance"):
        if converted.get(name) is not None:
            try:
                converted[name] = float(converted[name])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {name} must be a number, got {converted[name]!r}") from None
    for name in ("name", "kind", "adapter", "image_encoder", "reference_mode", "layers"):
        if converted.get(name) is not None:
            converted[name] = str(converted[name])
    return MethodSpec(**converted)


def method_entry(entry: Any, where: str) -> MethodSpec:
    """One entry of ``methods``: a MethodSpec, ``NAME:KIND[:key=value,...]`` or a mapping."""
    if isinstance(entry, MethodSpec):
        return entry
    if isinstance(entry, str):
        return parse_method(entry)
    if isinstance(entry, dict):
        return method_from_mapping(entry, where)
    raise ValueError(f"{where}: expected a mapping (name, kind, ...) or 'NAME:KIND[:key=value,...]', "
                     f"found {type(entry).__name__}")


@dataclass
class EvalConfig:
    model: str = field(default="", metadata=_m("Stable Diffusion model: a diffusers folder or hub id (default for "
                                                "toy: sets: imprompt's shipped toy model)"))
    methods: list[MethodSpec] = field(default_factory=list, metadata=_m(
        "a method to evaluate, NAME:KIND[:key=value,...]; KIND is one of " + ", ".join(KINDS) + "; keys: adapter, "
        "image_encoder, scale (ip_adapter), strength (img2img); repeat for several (replaces the file's list)",
        short="--method", metavar="NAME:KIND[:key=value,...]", parse=method_entry))
    data: str = field(default="toy:test", metadata=_m("evaluation set: a folder of name.png + name.txt (caption), "
                                                      "or toy:test / toy:heldout (the toy world's splits)"))
    references: int = field(default=100, metadata=_m("number of reference images (the first N; folders sorted by name)"))
    samples: int = field(default=4, metadata=_m("generations per reference (the paper: 4)"))
    seed: int = field(default=0, metadata=_m("base seed: sample j of reference i uses seed + i * samples + j, for every method"))
    clip_model: str = field(default="", metadata=_m("scoring CLIP: a folder with a transformers CLIPModel, its tokenizer and "
                                                    "image processor (toy: sets: the toy package's, if it ships one)"))
    clip_t_weight: float = field(default=1.0, metadata=_m("CLIP-T = weight * max(cos, 0): 1 gives the paper's plain "
                                                          "cosine, 2.5 CLIPScore's"))
    steps: int = field(default=30, metadata=_m("denoising steps"))
    guidance: float = field(default=7.5, metadata=_m("classifier-free guidance scale (unconditional runs without: "
                                                     "with an empty prompt it changes nothing)"))
    scheduler: str | None = field(default=None, metadata=_m("scheduler (default: the model's own)", choices=list(SCHEDULERS)))
    output_dir: str = field(default="eval", metadata=_m("report folder"))
    scales: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], metadata=_m(
        "ip_adapter scales of the scale sweep (repeat the flag; default 0, 0.25, 0.5, 0.75, 1)", metavar="SCALE"))
    scale_sweep: bool = field(default=True, metadata=_m("run the scale sweep (image + text at each scale) and plot it"))
    multimodal: bool = field(default=True, metadata=_m("run the image + text evaluation (toy: a text changing one "
                                                       "attribute; folders: the caption)"))
    # Default 4 = the default samples: one reference per call, so a real model's memory use is unchanged.
    batch_images: int = field(default=4, metadata=_m(
        "images per pipeline call: the samples of several references go through the UNet together (faster where a "
        "call's overhead dominates: small models, CPUs; the toy config uses 64); at most --samples: one reference "
        "per call. Results agree to float rounding, not bit for bit (imprompt.generation.batched)"))
    sheet_references: int = field(default=8, metadata=_m("references shown in the contact sheets"))
    save_images: bool = field(default=False, metadata=_m("also write every generation to OUTPUT_DIR/images/"))
    device: str = field(default="auto", metadata=_m("torch device: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:1, mps"))
    dtype: str = field(default="auto", metadata=_m("weights dtype (auto: float16 on a GPU, float32 on the CPU)",
                                                   choices=list(DTYPES)))
    models_dir: list[str] = field(default_factory=list, metadata=_m(
        "an AUTOMATIC1111 / Forge / ComfyUI root or a folder of models, where --model and the methods' adapter= "
        "and image_encoder= names are looked up; repeat for several (default: $IMPROMPT_MODELS_DIR)", metavar="DIR"))
    model_config: str | None = field(default=None, metadata=_m(
        "for a single-file --model of a custom architecture: a diffusers folder whose configs to use", metavar="FOLDER"))
    progress: bool = field(default=True, metadata=_m("show a progress bar"))

    @property
    def toy_split(self) -> str | None:
        return self.data[len("toy:"):] if self.data.startswith("toy:") else None

    def check(self) -> None:
        if not self.methods:
            raise ValueError("give at least one method (--method NAME:KIND[:key=value,...] or 'methods:' in the config file)")
        if not self.model:
            # Checked before the methods: without a model no defaults were filled in, and an adapter
            # method would otherwise be blamed for the missing adapter.
            raise ValueError(f"evaluation needs --model (or 'model:' in the config file): the shipped toy model, "
                             f"adapters and scoring CLIP are defaults only for --data toy:test / toy:heldout; for "
                             f"{self.data!r} give --model, adapter=PATH for each adapter method, and --clip-model")
        for method in self.methods:
            if not isinstance(method, MethodSpec):
                raise ValueError(f"methods must be MethodSpec entries, got {type(method).__name__}")
            try:
                method.check()
            except ValueError as err:
                if self.toy_split is not None and method.kind in ADAPTER_KINDS and not method.adapter:
                    raise ValueError(f"{err} (the toy defaults fill adapters in only when --model is not given)") from None
                raise
        names = [m.name for m in self.methods]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"method names must be unique; {duplicates} appear more than once")
        if not self.clip_model:
            raise ValueError("evaluation needs a scoring CLIP: --clip-model FOLDER (a transformers CLIPModel with its "
                             "tokenizer and image processor)")
        for name in ("references", "samples", "steps", "sheet_references", "batch_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.clip_t_weight <= 0:
            raise ValueError(f"clip_t_weight must be positive, got {self.clip_t_weight}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.scale_sweep and any(m.kind == "ip_adapter" for m in self.methods) and not self.scales:
            raise ValueError("the scale sweep needs at least one scale (or --no-scale-sweep)")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales must be distinct, got {self.scales}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def load_config(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> EvalConfig:
    """A config from a YAML file (optional), with command-line values taking precedence (every value
    coerced to its field's type, methods parsed: :func:`imprompt.config.load_config`)."""
    return _load_config(EvalConfig, path, overrides)


def with_toy_defaults(config: EvalConfig) -> EvalConfig:
    """For a toy: set without --model: the shipped toy model, adapter, image encoder and scoring CLIP.

    Only fields left empty are filled; a model given explicitly (e.g. a toy build's own folder) gets
    no defaults, so nothing is mixed from two builds.
    """
    split = config.toy_split
    if split is None or config.model:
        return config
    from .. import toy

    if not toy.toy_available():
        raise ValueError(f"no --model given and the shipped toy models are missing from {toy.PACKAGE_DIR}; build "
                         "them with `imprompt toy build`, or pass --model (and adapters, --clip-model)")
    paths = toy.toy_paths()
    methods = []
    for m in config.methods:
        if m.kind == "ip_adapter":
            m = dataclasses.replace(m, adapter=m.adapter or str(paths["adapter"]),
                                    image_encoder=m.image_encoder or str(paths["image_encoder"]))
        elif m.kind == "shared":  # the simple adapter trained beside it (same data and budget)
            m = dataclasses.replace(m, adapter=m.adapter or str(paths["simple_adapter"]),
                                    image_encoder=m.image_encoder or str(paths["image_encoder"]))
        methods.append(m)
    clip = config.clip_model or (str(paths["clip"]) if paths["clip"].is_dir() else "")
    if not clip:
        raise ValueError(f"the toy package at {toy.PACKAGE_DIR} ships no scoring CLIP (no {paths['clip']}); pass "
                         "--clip-model FOLDER with the toy build's CLIPModel, tokenizer and image processor")
    return dataclasses.replace(config, model=str(paths["model"]), methods=methods, clip_model=clip)
