"""A whole generation job as one typed request: check, load, generate, write PNGs with metadata.

The command line (``imprompt generate``), and later the web UI and the API, build a
:class:`GenerateRequest` and call :func:`run`; they hold no logic of their own. A request is a
:class:`GenerationSettings` (the text and sampling settings, declared once there) plus what to load
and where to write.

Per-adapter options (``scale``, ``layers``, ``N=VALUE`` for adapter N) are parsed into one
:class:`~imprompt.generation.adapter_options.AdapterOptions` per adapter before anything is read or
loaded (:mod:`imprompt.generation.adapter_options`).

Order of work, so that a mistake costs a second, not a model load or a finished generation: every
argument, the device and the output folder are checked; then the small inputs (reference images,
masks) are read; then the adapters and image encoders; then the model. Images are generated
``batch_size`` at a time and written as each batch finishes.

Seeds: image ``i`` of a run uses seed ``SEED + i`` with its own ``torch.Generator('cpu')``, as
AUTOMATIC1111 does, and its PNG records that seed. So an image does not depend on how the run was
batched, and ``--seed SEED+i --num-images 1`` generates image ``i`` again.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from PIL import Image

from ..adapter.attach import attach
from ..adapter.embeds_scaling import EMBEDS_SCALING
from ..adapter.layers import PRESETS
from ..adapter.weight_types import WEIGHT_TYPES
from ..config import option
from ..encoding import CROP_MODES, load_image
from ..files import check_writable_folder, remove_debris
from ..models.catalog import Catalog, resolve_name, roots_from
from .acceleration import Acceleration
from .adapter_options import AdapterOptions, ImageReader, adapter_options, load_image_prompts, split_target
from .controls import as_call_value, control_options
from .embeds import ImageFeatures, load_embeds
from .generate import generate
from .matrix import matrix_grid, matrix_prompts
from .networks import Networks, prompt_tags
from .outputs import infotext, next_index, save_control_maps, save_numbered_png
from .loading import LoadedModels, load_models
from .pipelines import DTYPE_NAMES, OFFLOAD_MODES, MemoryOptions, pick_device, pick_dtype
from .pnginfo import save_png
from .preprocess import PREPROCESSORS
from .prompts import COMBINE_MODES, DEFAULT_SCALE, ImagePrompt, encode_image_prompts
from .reference import REFERENCE_MODES, ReferenceOptions
from .settings import MAX_SEED, GenerationSettings
from .text_diff import DEFAULT_STRENGTH

DTYPES = DTYPE_NAMES
MAX_BATCH = 64


@dataclass
class GenerateRequest(GenerationSettings):
    """A generation job: the settings, plus the models, references and output."""

    model: str = field(default="", metadata=option(
        "Stable Diffusion model: a single-file checkpoint (.safetensors / .ckpt), a diffusers folder, a hub id "
        "(cached hub ids work offline) or a name found in --models-dir; default: imprompt's bundled toy model"))
    models_dir: list[str] = field(default_factory=list, metadata=option(
        "root of an AUTOMATIC1111 / Forge / ComfyUI install or any folder of models, where --model, --adapter, "
        "--controlnet and --image-encoder names are looked up; repeat for several (default: $IMPROMPT_MODELS_DIR)",
        metavar="DIR"))
    model_config: str | None = field(default=None, metadata=option(
        "for a single-file --model: a diffusers folder whose configs and tokenizers to use instead of the "
        "shipped SD1.5 / SD2 / SDXL ones", metavar="DIR"))
    adapter: list[str] = field(default_factory=list, metadata=option(
        "IP-Adapter checkpoint (.safetensors or .bin, official format) or its name; repeat for several",
        metavar="FILE"))
    image: list[str] = field(default_factory=list, metadata=option(
        "reference image, PATH or N=PATH for adapter N; repeat for several", metavar="REF"))
    scale: list[str] = field(default_factory=list, metadata=option(
        f"image prompt scale, VALUE or N=VALUE (default {DEFAULT_SCALE})"))
    combine: list[str] = field(default_factory=list, metadata=option(
        f"how several images of one adapter combine: {'|'.join(COMBINE_MODES)}, or N=MODE "
        "(default concat; weighted when --weights is given)"))
    weights: list[str] = field(default_factory=list, metadata=option(
        "weights of the images for combine=weighted (implied), 'W1,W2,...' or N=W1,W2"))
    layers: list[str] = field(default_factory=list, metadata=option(
        f"layer weights: a preset ({'|'.join(PRESETS)}) or 'block=w,...,default=w'; or N=..."))
    start: list[str] = field(default_factory=list, metadata=option(
        "first fraction of the steps the image prompt acts in (default 0), or N=VALUE"))
    end: list[str] = field(default_factory=list, metadata=option(
        "fraction of the steps where the image prompt stops (default 1), or N=VALUE"))
    mask: list[str] = field(default_factory=list, metadata=option(
        "region mask per reference image (white = acts), in --image order", metavar="PATH"))
    negative_image: list[str] = field(default_factory=list, metadata=option(
        "negative image prompt (replaces the unconditional image), PATH or N=PATH", metavar="PATH"))
    weight_type: list[str] = field(default_factory=list, metadata=option(
        f"how the scale spreads over the layers (ComfyUI's weight types): {'|'.join(WEIGHT_TYPES)} "
        "(quote names with spaces, or use _), or N=TYPE (default linear)"))
    composition_scale: list[str] = field(default_factory=list, metadata=option(
        "weight of the composition blocks for weight types style and composition / ... precise (--scale is "
        "the style weight), VALUE or N=VALUE (default: --scale)"))
    embeds_scaling: list[str] = field(default_factory=list, metadata=option(
        f"where the weight acts: {'|'.join(EMBEDS_SCALING)}, or N=MODE (default V only)"))
    negative_noise: list[str] = field(default_factory=list, metadata=option(
        "a noise image as negative image prompt: TYPE[:STRENGTH[:BLUR[:SEED]]], TYPE fade|dissolve|gaussian|"
        "shuffle, strength 0-1 (default 1), blur pixels (default 0), seed (default 0); or N=..."))
    image_encoder: list[str] = field(default_factory=list, metadata=option(
        "image encoder (CLIP vision folder, single file or name), PATH or N=PATH (default: the one the adapter "
        "needs, found beside it or in --models-dir)", metavar="PATH"))
    embeds: list[str] = field(default_factory=list, metadata=option(
        "saved image features (`imprompt encode`; diffusers or ComfyUI .ipadpt embeds) used instead of --image, "
        "PATH or N=PATH for adapter N (.safetensors or .ipadpt)", metavar="FILE"))
    tiles: list[str] = field(default_factory=list, metadata=option(
        "cut each reference into encoder-sized tiles (wide references keep their sides): on, masked (each tile "
        "acts on its part of the output), enhance (plus the whole reference), e.g. masked,enhance; or N=..."))
    tile_overlap: list[str] = field(default_factory=list, metadata=option(
        "least overlap of neighbouring tiles, fraction of a tile 0 to 0.9 (default 0), or N=VALUE"))
    tile_sharpen: list[str] = field(default_factory=list, metadata=option(
        "contrast-adaptive sharpening of a tiled reference, 0 to 1 (default 0), or N=VALUE"))
    face_embedding: list[str] = field(default_factory=list, metadata=option(
        "FaceID: insightface face-ID embedding (.npy or .safetensors, shape (512,) or (n, 512)), PATH or N=PATH; "
        "repeat for several faces (Portrait); default: computed from --image with insightface (pip install "
        "'imprompt[faceid]')", metavar="FILE"))
    lora_scale: list[str] = field(default_factory=list, metadata=option(
        "FaceID: scale of the adapter's LoRA (the official lora_scale), VALUE or N=VALUE (default 1)"))
    shortcut: list[str] = field(default_factory=list, metadata=option(
        "FaceID-Plus: keep the face-ID tokens and add the CLIP part (PlusV2), on|off or N=on|off "
        "(default: on for files named *v2*)"))
    s_scale: list[str] = field(default_factory=list, metadata=option(
        "FaceID-PlusV2: weight of the CLIP part with --shortcut on (s_scale), VALUE or N=VALUE (default 1)"))
    text_diff: list[str] = field(default_factory=list, metadata=option(
        "edit the image prompt with two texts (DALL-E 2's text diff, base adapters): 'FROM -> TO', FROM describing "
        "the reference, TO the change, e.g. 'blue background -> green background'; or N='FROM -> TO'",
        metavar="'FROM -> TO'"))
    text_diff_strength: list[str] = field(default_factory=list, metadata=option(
        f"how far the image embedding turns towards the text diff, 0 to 1 (default {DEFAULT_STRENGTH}; 0.25-0.5 "
        "usual), or N=VALUE"))
    text_diff_encoder: str | None = field(default=None, metadata=option(
        "the CLIP text tower of the image encoder, for --text-diff: a whole CLIP folder or a text model with "
        "projection (default: the pipeline's, as SDXL's text_encoder_2, or the image encoder folder's)",
        metavar="PATH"))
    crop: str = field(default="center", metadata=option(
        "reference preprocessing: center crop (CLIP) or pad to square", choices=list(CROP_MODES)))
    init_image: str | None = field(default=None, metadata=option("img2img / inpainting start image", metavar="PATH"))
    mask_image: str | None = field(default=None, metadata=option(
        "inpainting mask (white = repaint); needs --init-image", metavar="PATH"))
    # Per ControlNet (imprompt.generation.controls): VALUE for all, or N=VALUE for ControlNet N.
    controlnet: list[str] = field(default_factory=list, metadata=option(
        "ControlNet: a single file, a diffusers folder, a hub id or a name; repeat for several", metavar="PATH"))
    control_image: list[str] = field(default_factory=list, metadata=option(
        "ControlNet conditioning image, PATH (in --controlnet order) or N=PATH", metavar="PATH"))
    controlnet_scale: list[str] = field(default_factory=list, metadata=option(
        "ControlNet conditioning scale, VALUE or N=VALUE (default 1)"))
    control_start: list[str] = field(default_factory=list, metadata=option(
        "first fraction of the steps the ControlNet acts in (default 0), or N=VALUE"))
    control_end: list[str] = field(default_factory=list, metadata=option(
        "fraction of the steps where the ControlNet stops (default 1), or N=VALUE"))
    control_preprocess: list[str] = field(default_factory=list, metadata=option(
        "preprocessor making the control map from the control image (default none: the image is the map): "
        f"{'|'.join(PREPROCESSORS)}, or N=NAME", metavar="MODULE"))
    control_res: list[str] = field(default_factory=list, metadata=option(
        "preprocessor resolution: the image's short side before detection (-1: as given), or N=PIXELS"))
    control_threshold_a: list[str] = field(default_factory=list, metadata=option(
        "preprocessor threshold a (canny: low, default 100; scribble_xdog: 32; tile_resample: down sampling "
        "rate; blur_gaussian: sigma), or N=VALUE"))
    control_threshold_b: list[str] = field(default_factory=list, metadata=option(
        "preprocessor threshold b (canny: high, default 200), or N=VALUE"))
    save_control_map: bool = field(default=False, metadata=option(
        "also write each preprocessed control map beside the images (control-INDEX-N.png)"))
    reference_image: str | None = field(default=None, metadata=option(
        "Reference-only (A1111 ControlNet's reference_*): the UNet's self-attention / feature statistics "
        "follow this image; no adapter needed, combines with --image and --controlnet", metavar="PATH"))
    reference_mode: str = field(default="reference_only", metadata=option(
        "what --reference-image steers", choices=list(REFERENCE_MODES)))
    style_fidelity: float = field(default=0.5, metadata=option(
        "Reference-only style fidelity 0..1: 1 keeps the reference out of the unconditional half, so guidance "
        "amplifies it; 0 gives it to both halves (not 'off': --reference-weight 0 is)"))
    reference_weight: float = field(default=1.0, metadata=option(
        "Reference-only weight 0..2: the share of layers that read the reference (A1111's unit weight)"))
    reference_start: float = field(default=0.0, metadata=option("fraction of the steps where Reference-only starts"))
    reference_end: float = field(default=1.0, metadata=option("fraction of the steps where Reference-only stops"))
    accelerate: str | None = field(default=None, metadata=option(
        "opt-in step skipping, faster at a small cost in fidelity: tgate:STEP (T-GATE: cross-attention computed "
        "for the first STEP steps, then reused, and guidance dropped) or deepcache:N (DeepCache: the whole UNet "
        "every N steps, only its shallow blocks in between); off by default", metavar="METHOD:N"))
    output: str = field(default="outputs", metadata=option("folder for the PNGs"))
    batch_size: int = field(default=4, metadata=option(
        f"images per pipeline call (1 to {MAX_BATCH}); lower it if memory runs out. Images do not depend on it"))
    dtype: str = field(default="auto", metadata=option(
        "weights dtype (auto: float16 on a GPU, float32 on the CPU)", choices=["auto", *DTYPES]))
    device: str = field(default="auto", metadata=option(
        "torch device: auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps"))
    attention_slicing: bool = field(default=False, metadata=option("compute attention in slices (less GPU memory)"))
    vae_tiling: bool = field(default=False, metadata=option("decode large images tile by tile (less GPU memory)"))
    cpu_offload: str | None = field(default=None, metadata=option(
        "keep weights on the CPU and move them to the GPU as needed: per model, or per layer (least memory)",
        choices=list(OFFLOAD_MODES)))
    prompt_matrix: bool = field(default=False, metadata=option(
        "A1111's prompt matrix: 'a cat|in the snow|at night' draws every combination of the parts after the "
        "first (same seed), plus one labelled grid (grid-N.png)"))

    def __post_init__(self) -> None:
        # The single-ControlNet forms of the library (controlnet="...", controlnet_scale=0.5) as lists.
        for name in ("controlnet", "control_image"):
            value = getattr(self, name)
            if value is None or isinstance(value, (str, Path)):
                setattr(self, name, [] if value is None else [str(value)])
        if isinstance(self.controlnet_scale, (int, float)):  # one scale for every ControlNet (none: no scale)
            self.controlnet_scale = [repr(float(self.controlnet_scale))] if self.controlnet else []

    def reference(self, image: "Image.Image | None") -> ReferenceOptions:
        """The Reference-only options of this request, for ``image``."""
        return ReferenceOptions(image, self.reference_mode, self.style_fidelity, self.reference_weight,
                                start=self.reference_start, end=self.reference_end)

    @property
    def acceleration(self) -> Acceleration | None:
        """``accelerate`` parsed (None: off); raises ValueError for a malformed value."""
        return Acceleration.parse(self.accelerate)

    @property
    def memory(self) -> MemoryOptions:
        return MemoryOptions(self.attention_slicing, self.vae_tiling, self.cpu_offload)

    @property
    def task(self) -> str:
        if self.mask_image is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "text2img"

    def settings(self, **changes) -> GenerationSettings:
        """The GenerationSettings part of this request (with ``changes``): the ControlNets' options parsed."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationSettings)}
        controls = control_options(self)
        values.update(controlnet_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0)
        if controls:
            values.update(controlnet_scale=as_call_value([c.scale for c in controls]),
                          control_guidance_start=as_call_value([c.start for c in controls]),
                          control_guidance_end=as_call_value([c.end for c in controls]))
        return GenerationSettings(**{**values, **changes})

    def check(self) -> None:
        """Every check that needs no file read and no model loaded; raises ValueError."""
        self.settings().check()  # the ControlNets' options parsed and checked too
        if self.mask_image is not None and self.init_image is None:
            raise ValueError("--mask-image (inpainting) needs --init-image")
        if self.prompt_matrix:
            matrix_prompts(self.prompt)  # raises for a prompt without parts
        if (self.image or self.embeds) and not self.adapter:
            raise ValueError(f"{'--image' if self.image else '--embeds'} needs an --adapter to read it")
        if self.adapter and not (self.image or self.embeds or self.face_embedding):
            raise ValueError("give at least one --image (or --embeds; FaceID: or --face-embedding) for the adapter(s)")
        if self.init_image is not None and int(self.steps * self.strength) < 1:
            raise ValueError(f"--steps {self.steps} at --strength {self.strength:g} leaves no denoising step "
                             f"(img2img runs steps x strength); raise one of them")
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH}, got {self.batch_size}")
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"seed {self.seed} + {self.num_images} images runs past 2**64-1 (image i uses seed+i); "
                             "give a smaller seed")
        device = pick_device(self.device)
        pick_dtype(self.dtype, device)
        self.memory.check(device)
        if self.reference_image is not None:
            self.reference(None).check()
        if (acceleration := self.acceleration) is not None:
            acceleration.check(self.steps)
            if self.reference_image is not None:
                raise ValueError(f"--accelerate {acceleration.describe()} does not combine with --reference-image; "
                                 "leave one of them out")
            if acceleration.method == "deepcache" and self.cpu_offload:
                raise ValueError(f"--accelerate {acceleration.describe()} does not work with --cpu-offload (the "
                                 "shallow steps call the UNet's blocks directly); leave one of them out")
        if self.crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        check_writable_folder(self.output, "--output")


def resolve_names(request: GenerateRequest, catalog: Catalog | None) -> GenerateRequest:
    """Model, adapter, ControlNet and encoder names looked up in the model folders (paths and hub ids stay)."""
    if catalog is None:
        return request

    def targeted(values: list[str], kind: str) -> list[str]:
        out = []
        for raw in values:
            index, text = split_target(raw)
            name = resolve_name(text, kind, catalog)
            out.append(name if index is None else f"{index}={name}")
        return out

    return dataclasses.replace(
        request,
        model=resolve_name(request.model, "checkpoint", catalog) if request.model else request.model,
        adapter=[resolve_name(a, "adapter", catalog) for a in request.adapter],
        controlnet=[resolve_name(c, "controlnet", catalog) for c in request.controlnet],
        image_encoder=targeted(request.image_encoder, "image_encoder"),
    )


def with_toy_defaults(request: GenerateRequest, log: Callable[[str], None]) -> GenerateRequest:
    """No --model: the bundled toy world (tiny SD, its CLIP image encoder and IP-Adapter)."""
    if request.model:
        return request
    from .. import toy

    if not toy.toy_available():
        raise ValueError(f"no --model given and the bundled toy model is missing from {toy.PACKAGE_DIR}; "
                         "pass --model PATH_OR_HUB_ID, or build the toy world with `imprompt toy build`")
    paths = toy.toy_paths()
    log("note: no --model given, using imprompt's bundled toy model (32x32 shapes world); "
        "pass --model PATH_OR_HUB_ID (and --adapter) for Stable Diffusion")
    changes: dict = {"model": str(paths["model"])}
    if (request.image or request.embeds) and not request.adapter:
        changes["adapter"] = [str(paths["adapter"])]
        changes["image_encoder"] = request.image_encoder or [str(paths["image_encoder"])]
    return dataclasses.replace(request, **changes)


def with_toy_text_tower(request: GenerateRequest) -> GenerateRequest:
    """Text diffs on the toy model: its CLIP's text tower (the image encoder's partner) unless one is given."""
    from .. import toy

    if request.text_diff and not request.text_diff_encoder and toy.is_toy_model(request.model):
        return dataclasses.replace(request, text_diff_encoder=str(toy.toy_paths()["clip"]))
    return request


@dataclass
class Inputs:
    """The small inputs of a request, read before any model loads."""

    prompts: list[ImagePrompt]
    init: "Image.Image | None" = None
    mask: "Image.Image | None" = None
    controls: "list[Image.Image]" = field(default_factory=list)  # one control map per ControlNet, preprocessed
    preprocessed: list[int] = field(default_factory=list)  # the ControlNets whose map a preprocessor made
    reference: "Image.Image | None" = None  # Reference-only's image

    @property
    def control(self) -> "Image.Image | list[Image.Image] | None":
        """The control image(s) as generate() takes them."""
        return None if not self.controls else as_call_value(self.controls)


def read_inputs(request: GenerateRequest, options: Sequence[AdapterOptions], read: ImageReader = load_image,
                read_embeds: Callable[[str], ImageFeatures] = load_embeds) -> Inputs:
    """The references, init image, mask and control maps (each control image through its preprocessor;
    the shuffle preprocessor is seeded by the request's seed, 0 without one). ``read`` and
    ``read_embeds`` turn names into images and features (files by default; the server's uploads)."""
    controls = control_options(request)
    return Inputs(load_image_prompts(options, read, read_embeds),
                  read(request.init_image) if request.init_image else None,
                  read(request.mask_image, "L") if request.mask_image else None,
                  [c.control_map(read(c.image), seed=(request.seed or 0) % 2**32) for c in controls],
                  [c.index for c in controls if c.preprocess != "none"],
                  read(request.reference_image) if request.reference_image else None)


def reference_options(request: GenerateRequest, inputs: Inputs) -> ReferenceOptions | None:
    return request.reference(inputs.reference) if inputs.reference is not None else None


@dataclass(frozen=True)
class Rendered:
    """One generated image, its seed and its A1111 parameters text."""

    seed: int
    image: "Image.Image"
    parameters: str


def render(request: GenerateRequest, options: Sequence[AdapterOptions], models: LoadedModels, inputs: Inputs,
           seed: int, callback=None) -> Iterator[list[Rendered]]:
    """Generate the request's images, ``batch_size`` at a time; yields each batch as it finishes.

    ``callback``: a diffusers ``callback_on_step_end`` (progress, cancelling by raising). The adapters
    are attached for the call and detached after it, whatever happens; the caller makes sure no other
    generation uses the same UNet meanwhile (attaching changes its attention processors).
    """
    pipe = models.pipe
    reference = reference_options(request, inputs)
    acceleration = request.acceleration
    parameters = infotext(request, options, models, inputs)
    prompts = models.with_text_diffs(inputs.prompts)
    attachment = attach(pipe.unet, models.adapters) if models.adapters else None
    try:
        for first in range(0, request.num_images, request.batch_size):
            seeds = [seed + i for i in range(first, min(first + request.batch_size, request.num_images))]
            # One generator per image: image i is the same whatever the batching (see the module doc).
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            settings = request.settings(seed=None, num_images=len(seeds),
                                        extra={**request.extra, "generator": generators})
            images = generate(pipe, attachment, settings, prompts, models.encoders, init_image=inputs.init,
                              mask_image=inputs.mask, control_image=inputs.control, callback=callback,
                              networks=models.networks, reference=reference, acceleration=acceleration)
            yield [Rendered(s, image, parameters(s, image)) for s, image in zip(seeds, images)]
    finally:
        if attachment is not None:
            attachment.detach()


def pick_seed(request: GenerateRequest) -> int:
    return request.seed if request.seed is not None else random.SystemRandom().randrange(2**32)


def prepare(request: GenerateRequest, log: Callable[[str], None] = print, catalog: Catalog | None = None
            ) -> tuple[GenerateRequest, list[AdapterOptions], Catalog | None]:
    """Names looked up, toy defaults filled in, every argument checked: nothing read, nothing loaded.
    ``catalog``: the model folders already scanned (the server's); else --models-dir is scanned."""
    if catalog is None:
        roots = roots_from(request.models_dir)
        catalog = Catalog.scan(roots) if roots else None
    request = with_toy_text_tower(with_toy_defaults(resolve_names(request, catalog), log))
    from .. import toy

    if catalog is None and toy.is_toy_model(request.model):  # the toy world's own LoRA and embedding, by name
        catalog = Catalog.scan([toy.PACKAGE_DIR])
    request.check()
    check_networks(request, catalog)
    return request, adapter_options(request), catalog


def check_networks(request: GenerateRequest, catalog: Catalog | None) -> None:
    """The prompts' LoRA tags parse and name files in the model folders (before anything loads)."""
    tags = prompt_tags(request.prompt, request.negative_prompt)
    if tags and catalog is None:
        raise ValueError(f"the prompt names LoRAs ({', '.join(t.written for t in tags)}); give the model folders "
                         "they are in with --models-dir")
    if tags:
        Networks.from_catalog(catalog).uses(tags)


def run(request: GenerateRequest, log: Callable[[str], None] = print) -> list[Path]:
    """Check everything, load the models, generate, and write PNGs with A1111 parameters."""
    request, options, catalog = prepare(request, log)
    # The small inputs are read and checked before anything large is loaded.
    inputs = read_inputs(request, options)
    models = load_models(request, options, catalog)
    # The references are encoded once, now; the encoders this run loaded for itself are let go before the
    # denoising loop, so that they and the UNet's working memory are never resident together.
    prompts, models.encoders = encode_image_prompts(inputs.prompts, models.adapters, models.encoders)
    inputs = dataclasses.replace(inputs, prompts=prompts)
    seed = pick_seed(request)
    out_dir = Path(request.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if removed := remove_debris(out_dir, "*.png"):
        log(f"removed {removed} unfinished file(s) an interrupted run left in {out_dir}")
    index = first_index = next_index(out_dir)
    written: list[Path] = []
    if request.save_control_map:
        written += save_control_maps(out_dir, first_index, inputs, log)
    prompts = matrix_prompts(request.prompt) if request.prompt_matrix else [request.prompt]
    firsts = []
    for prompt in prompts:
        for n, batch in enumerate(render(dataclasses.replace(request, prompt=prompt), options, models, inputs, seed)):
            if n == 0:
                firsts.append(batch[0])
            for item in batch:
                path, index = save_numbered_png(out_dir, index, item.seed, item.image, item.parameters)
                written.append(path)
                index += 1
                log(f"wrote {path}")
    if request.prompt_matrix:
        grid = matrix_grid(request.prompt, [f.image for f in firsts])
        path = save_png(grid, out_dir / f"grid-{index:05d}.png", firsts[0].parameters, exclusive=True)
        written.append(path)
        log(f"wrote {path} ({len(prompts)} prompts)")
    return written
