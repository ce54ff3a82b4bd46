"""The web UI (Gradio), laid out as AUTOMATIC1111 / Forge users know it: a checkpoint picker, txt2img with
IP-Adapter units like the ControlNet extension's and a ControlNet unit, img2img / inpainting, sampling
settings, a gallery whose PNGs carry their parameters, and a PNG info tab that sends settings back.

The page holds no logic of its own: :func:`form_request` turns the form into a GenerateRequest (pure, so
it is tested without a browser) and the engine runs it like any API request. Results are written as PNGs
(with their ``parameters`` text) into a temporary folder the UI owns, never into the user's folders.
Widgets are read by name (:class:`UnitWidgets`, :class:`FormWidgets`), not by position in a long
argument list, so adding a field cannot shift the others.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..adapter.layers import PRESETS  # noqa: E402
from ..errors import one_line  # noqa: E402
from ..generation.pnginfo import parse_parameters, save_png  # noqa: E402
from ..generation.request import GenerateRequest  # noqa: E402
from ..generation.schedulers import SCHEDULERS  # noqa: E402
from .engine import Engine, Job  # noqa: E402
from .uploads import decode_upload  # noqa: E402

UNITS = 3  # adapter units shown (each may hold several references; disabled ones are left out)
MODEL_DEFAULT = "model default"
LAYER_CHOICES = [*((name.replace("_", " "), name) for name in PRESETS), ("custom (below)", "custom")]
SAMPLER_CHOICES = [(MODEL_DEFAULT, MODEL_DEFAULT), *((s.a1111, key) for key, s in SCHEDULERS.items())]
POLL_SECONDS = 0.2
CANVAS = 256  # blank mask canvases; the engine scales a mask to the output size
WHITE_BRUSH = gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed")  # white = the region


def blank_canvas() -> np.ndarray:
    return np.zeros((CANVAS, CANVAS, 3), np.uint8)


@dataclass
class UnitForm:
    """One IP-Adapter unit of the form."""

    enabled: bool = False
    adapter: str | None = None  # a catalog name
    images: list[str] = field(default_factory=list)  # uploaded file paths
    scale: float = 0.6
    layers: str = "all"  # a preset, or "custom" with custom_layers
    custom_layers: str = ""  # 'block=w,...,default=w' (imprompt.adapter.layers)
    weights: str = ""  # one weight per reference, comma-separated: combine them weighted
    image_encoder: str | None = None  # a catalog name; None: the one the adapter needs
    start: float = 0.0
    end: float = 1.0
    mask: Image.Image | None = None  # painted in the page: white = this unit acts there
    negative_image: str | None = None


@dataclass
class Form:
    model: str | None = None  # a catalog name; None: the server's default model
    prompt: str = ""
    negative_prompt: str = ""
    units: list[UnitForm] = field(default_factory=list)
    crop: str = "center"
    controlnet: str | None = None
    control_image: str | None = None
    init_image: str | None = None  # set: img2img, and inpainting where inpaint_mask is painted
    inpaint_mask: Image.Image | None = None
    strength: float = 0.75
    sampler: str = MODEL_DEFAULT
    steps: int = 20
    guidance: float = 7.0
    seed: int = -1  # -1: random
    width: int = 0  # 0: the model's own
    height: int = 0
    num_images: int = 1


def form_request(form: Form, lookup: Callable[[str, str], str], read_image: Callable[[str], Image.Image],
                 add_image: Callable[[Image.Image, str], str]) -> GenerateRequest:
    """The GenerateRequest of a filled form. ``lookup(name, kind)`` -> a model path found by name;
    ``read_image(path) -> image``; ``add_image(image, name) -> reference name`` files an image for the
    engine (the name is what PNG info shows). Enabled units become adapters 0, 1, ... (``N=`` values);
    messages name the unit as the page numbers it."""
    values: dict[str, list[str]] = {k: [] for k in ("adapter", "image", "scale", "layers", "start", "end", "mask",
                                                    "negative_image", "weights", "image_encoder")}
    units = [(number, u) for number, u in enumerate(form.units, 1) if u.enabled]
    masked = any(u.mask is not None for _, u in units)
    for i, (number, unit) in enumerate(units):
        if not unit.adapter:
            raise ValueError(f"IP-Adapter unit {number} is enabled but has no adapter chosen")
        if not unit.images:
            raise ValueError(f"IP-Adapter unit {number} has no reference image; drop one in, or disable the unit")
        values["adapter"].append(lookup(unit.adapter, "adapter"))
        for path in unit.images:
            values["image"].append(f"{i}={add_image(read_image(path), Path(path).name)}")
            if masked:  # masks go one per reference, so once one unit is masked every unit needs one: white = all
                mask = unit.mask if unit.mask is not None else Image.new("L", (CANVAS, CANVAS), 255)
                values["mask"].append(add_image(mask, f"unit{number}-mask.png"))
        values["scale"].append(f"{i}={unit.scale:g}")
        if unit.layers == "custom":
            if not unit.custom_layers.strip():
                raise ValueError(f"IP-Adapter unit {number}: custom layers need 'block=weight,...', e.g. "
                                 "'up_blocks.1=1,default=0'")
            values["layers"].append(f"{i}={unit.custom_layers.strip()}")
        else:
            values["layers"].append(f"{i}={unit.layers}")
        if unit.weights.strip():
            values["weights"].append(f"{i}={unit.weights.strip()}")
        if unit.image_encoder:
            values["image_encoder"].append(f"{i}={lookup(unit.image_encoder, 'image_encoder')}")
        values["start"].append(f"{i}={unit.start:g}")
        values["end"].append(f"{i}={unit.end:g}")
        if unit.negative_image:
            values["negative_image"].append(f"{i}={add_image(read_image(unit.negative_image), 'negative.png')}")
    init = add_image(read_image(form.init_image), Path(form.init_image).name) if form.init_image else None
    inpaint = add_image(form.inpaint_mask, "inpaint-mask.png") if init and form.inpaint_mask is not None else None
    control = add_image(read_image(form.control_image), Path(form.control_image).name) if form.control_image else None
    if form.controlnet and not control:
        raise ValueError("the ControlNet unit has a model but no control image")
    return GenerateRequest(
        model=lookup(form.model, "checkpoint") if form.model else "", prompt=form.prompt,
        negative_prompt=form.negative_prompt, crop=form.crop, steps=int(form.steps), guidance=float(form.guidance),
        seed=None if form.seed is None or int(form.seed) < 0 else int(form.seed),
        width=int(form.width) or None, height=int(form.height) or None, num_images=int(form.num_images),
        scheduler=None if form.sampler in (None, MODEL_DEFAULT) else form.sampler,
        controlnet=lookup(form.controlnet, "controlnet") if form.controlnet and control else None,
        control_image=control if form.controlnet else None, init_image=init, mask_image=inpaint,
        strength=float(form.strength), **values)


def painted_mask(value: Any) -> Image.Image | None:
    """What was painted on an ImageEditor, as a white-on-black mask: the strokes of its layers (alpha), or,
    where Gradio flattened them into the composite, the pixels where it differs from the background
    (only then: a browser's re-encoded composite may differ everywhere by a shade). None: nothing painted."""
    if not isinstance(value, dict):
        return None
    painted = None
    for layer in value.get("layers") or []:
        array = np.asarray(layer) if layer is not None else None
        if array is not None and array.ndim == 3 and array.shape[2] == 4:
            painted = array[:, :, 3] > 0 if painted is None else painted | (array[:, :, 3] > 0)
    background, composite = value.get("background"), value.get("composite")
    if (painted is None or not painted.any()) and background is not None and composite is not None:
        b, c = np.asarray(background), np.asarray(composite)
        if b.shape[:2] == c.shape[:2]:
            channels = min(b.shape[2] if b.ndim == 3 else 1, c.shape[2] if c.ndim == 3 else 1, 3)
            painted = np.any(b.reshape(*b.shape[:2], -1)[:, :, :channels] != c.reshape(*c.shape[:2], -1)[:, :, :channels],
                             axis=2)
    if painted is None or not painted.any():
        return None
    return Image.fromarray((painted * 255).astype(np.uint8), "L")


def png_info_text(path: str | None) -> str:
    if not path:
        return ""
    with Image.open(path) as image:
        return str(image.info.get("parameters", ""))


def send_back(text: str) -> list:
    """PNG info -> the form's prompt, negative prompt, steps, CFG, seed, sampler, width, height (unchanged
    where absent)."""
    values = parse_parameters(text) if text else {}
    sampler = next((key for key, s in SCHEDULERS.items() if s.a1111 == values.get("Sampler")), None)
    width, _, height = values.get("Size", "").partition("x")
    return [values.get("Prompt", gr.skip()) if values else gr.skip(),
            values.get("Negative prompt", gr.skip()),
            int(values["Steps"]) if values.get("Steps", "").isdigit() else gr.skip(),
            float(values["CFG scale"]) if "CFG scale" in values else gr.skip(),
            int(values["Seed"]) if values.get("Seed", "").isdigit() else gr.skip(),
            sampler or gr.skip(),
            int(width) if width.isdigit() else gr.skip(), int(height) if height.isdigit() else gr.skip()]


class Session:
    """What the page needs from the engine, plus the folder its result PNGs are served from (removed when
    the session is collected or the process exits)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._folder = tempfile.TemporaryDirectory(prefix="imprompt-ui-")
        self.folder = Path(self._folder.name)

    def names(self, kind: str) -> list[str]:
        return [e.name for e in self.engine.catalog.of_kind(kind) if e.usable]

    def adapter_choices(self) -> list[tuple[str, str]]:
        """(label, name): the label adds the detected variant, as ``imprompt models`` shows it."""
        def label(details: dict) -> str:
            tokens = f", {details['num_tokens']} tokens" if details.get("num_tokens") else ""
            return f"{details.get('variant', 'unknown variant')}{tokens}"
        return [(f"{e.name} ({label(e.info.details)})", e.name) for e in self.engine.catalog.of_kind("adapter")
                if e.usable]

    def default_checkpoint(self) -> str | None:
        from .app import default_model  # app imports this module when it mounts the UI

        wanted = default_model(self.engine)
        return next((e.name for e in self.engine.catalog.of_kind("checkpoint") if str(e.path) == wanted), None)

    def lookup(self, name: str, kind: str) -> str:
        return str(self.engine.catalog.find(name, kind).path)

    def read(self, path: str) -> Image.Image:
        config = self.engine.config
        return decode_upload(Path(path).read_bytes(), field=Path(path).name, max_bytes=config.max_upload_bytes,
                             max_pixels=config.max_pixels)

    def run(self, form: Form):
        """Submit, then yield (progress text, gallery paths or None, parameters text, job) every
        POLL_SECONDS until the job is done. The job travels to the caller (each browser tab keeps its own
        in a gr.State), never on the session. A refused request or failed job: the message, one line, in
        the status box and as gr.Error."""
        images: dict[str, Image.Image] = {}

        def add(image: Image.Image, name: str) -> str:
            unique, n = name, 1
            while unique in images:
                n += 1
                unique = f"{Path(name).stem}-{n}{Path(name).suffix or '.png'}"
            images[unique] = image
            return unique

        try:
            request = form_request(form, self.lookup, self.read, add)
            if not request.model:
                from .app import default_model

                request.model = default_model(self.engine)
            job = self.engine.submit(request, images, source="ui")
        except (ValueError, FileNotFoundError) as err:
            yield error_box(one_line(err)), None, "", None
            raise gr.Error(one_line(err)) from None
        while not job.done:
            yield f"step {job.step} of {job.total_steps} ({job.state})", None, "", job
            time.sleep(POLL_SECONDS)
        if job.state == "failed":
            yield error_box(job.error or "the generation failed"), None, "", job
            raise gr.Error(job.error or "the generation failed")
        if job.state == "cancelled":
            yield f"cancelled at step {job.step} of {job.total_steps}", None, "", job
            return
        paths = [str(save_png(item.image, self.folder / f"{job.id}-{n}-{item.seed}.png", item.parameters))
                 for n, item in enumerate(job.images)]
        yield (f"done: {len(paths)} image(s), step {job.total_steps} of {job.total_steps}", paths,
               "\n\n".join(r.parameters for r in job.images), job)


def add_network(text: str, kind: str, name: str | None) -> str:
    """The prompt with a LoRA tag (``<lora:NAME:1>``, A1111's default multiplier) or an embedding's name
    appended, comma-separated as A1111's extra-networks cards add them."""
    if not name:
        return text
    item = f"<lora:{name}:1>" if kind == "lora" else name
    text = text.rstrip()
    return f"{text}, {item}" if text and not text.endswith(",") else f"{text} {item}".strip()


def error_box(message: str) -> str:
    return f"**Error:** {message}"


@dataclass
class UnitWidgets:
    enabled: gr.Checkbox
    adapter: gr.Dropdown
    images: gr.File
    scale: gr.Slider
    layers: gr.Dropdown
    custom_layers: gr.Textbox
    weights: gr.Textbox
    image_encoder: gr.Dropdown
    start: gr.Slider
    end: gr.Slider
    mask: gr.ImageEditor
    negative_image: gr.Image

    def components(self) -> list:
        return list(vars(self).values())

    def read(self, data: dict) -> UnitForm:
        return UnitForm(bool(data[self.enabled]), data[self.adapter], [str(f) for f in data[self.images] or []],
                        float(data[self.scale]), data[self.layers], data[self.custom_layers] or "",
                        data[self.weights] or "", data[self.image_encoder] or None, float(data[self.start]),
                        float(data[self.end]), painted_mask(data[self.mask]), data[self.negative_image])


def unit_widgets(number: int, session: Session) -> UnitWidgets:
    """One IP-Adapter unit's widgets, in an accordion (the first open and enabled)."""
    # The region is painted in the output's frame (white: the unit acts there); start / end are fractions
    # of the denoising steps, as the ControlNet extension's starting / ending control step.
    with gr.Accordion(f"IP-Adapter unit {number}", open=number == 1, elem_id=f"unit{number - 1}"):
        with gr.Row():
            with gr.Column(scale=3, min_width=320):
                with gr.Row(equal_height=True):
                    enabled = gr.Checkbox(number == 1, label="Enable", elem_id=f"unit{number - 1}_enabled",
                                          scale=1, min_width=90)
                    choices = session.adapter_choices()
                    adapter = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Adapter",
                                          scale=4)
                images = gr.File(file_count="multiple", file_types=["image"], label="Reference image(s)",
                                 height=120, elem_id=f"unit{number - 1}_refs")
                with gr.Row():
                    scale = gr.Slider(0, 2, 0.6, step=0.05, label="Weight", min_width=140,
                                      elem_id=f"unit{number - 1}_weight")
                    layers = gr.Dropdown(LAYER_CHOICES, value="all", label="Layers", min_width=140,
                                         elem_id=f"unit{number - 1}_layers")
                with gr.Row():
                    start = gr.Slider(0, 1, 0, step=0.05, label="Start", min_width=140)
                    end = gr.Slider(0, 1, 1, step=0.05, label="End", min_width=140)
            with gr.Column(scale=2, min_width=260):
                mask = gr.ImageEditor(label="Region mask (blank: all)", type="numpy",
                                      value=blank_canvas(), canvas_size=(CANVAS, CANVAS), height=330, sources=(),
                                      brush=WHITE_BRUSH, elem_id=f"unit{number - 1}_mask")
        with gr.Accordion("More: custom layers, per-image weights, encoder, negative image", open=False):
            with gr.Row():
                custom = gr.Textbox(label="Custom layers (block=w,...,default=w)", scale=2)
                weights = gr.Textbox(label="Per-image weights (w1,w2,...)", scale=1)
                encoder = gr.Dropdown([None, *session.names("image_encoder")], value=None,
                                      label="Image encoder (empty: the one it needs)", scale=1)
            negative_image = gr.Image(type="filepath", label="Negative image", height=120)
    return UnitWidgets(enabled, adapter, images, scale, layers, custom, weights, encoder, start, end, mask,
                       negative_image)


@dataclass
class FormWidgets:
    model: gr.Dropdown
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    units: list[UnitWidgets]
    crop: gr.Radio
    controlnet: gr.Dropdown
    control_image: gr.Image
    sampler: gr.Dropdown
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    width: gr.Number
    height: gr.Number
    num_images: gr.Slider
    init_image: gr.Image | None = None  # the img2img tab's, set once it is built
    inpaint: gr.ImageEditor | None = None
    strength: gr.Slider | None = None

    def components(self) -> set:
        singles = [v for k, v in vars(self).items() if k != "units" and v is not None]
        return {*singles, *(c for unit in self.units for c in unit.components())}

    def read(self, data: dict, img2img: bool) -> Form:
        """The form; img2img's inputs only for its own Generate button (A1111's tabs are separate modes)."""
        seed = data[self.seed]
        return Form(data[self.model], data[self.prompt] or "", data[self.negative_prompt] or "",
                    [unit.read(data) for unit in self.units], data[self.crop], data[self.controlnet],
                    data[self.control_image], data[self.init_image] if img2img else None,
                    painted_mask(data[self.inpaint]) if img2img else None, float(data[self.strength]),
                    data[self.sampler], int(data[self.steps]), float(data[self.guidance]),
                    int(seed) if seed is not None else -1, int(data[self.width] or 0), int(data[self.height] or 0),
                    int(data[self.num_images]))


@dataclass
class ResultWidgets:
    generate: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    gallery: gr.Gallery
    info: gr.Textbox


def result_widgets(prefix: str) -> ResultWidgets:
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", size="lg", elem_id=f"{prefix}generate")
        cancel = gr.Button("Cancel", size="lg", elem_id=f"{prefix}cancel")
    status = gr.Markdown("", elem_id=f"{prefix}status")
    gallery = gr.Gallery(label="Results", columns=2, height=360, elem_id=f"{prefix}gallery", format="png",
                         object_fit="contain")
    info = gr.Textbox(label="PNG info of the results", lines=5, elem_id=f"{prefix}info")
    return ResultWidgets(generate, cancel, status, gallery, info)


def build_ui(engine: Engine) -> gr.Blocks:
    session = Session(engine)
    with gr.Blocks(title="imprompt") as ui:
        gr.Markdown("## imprompt · image prompts for Stable Diffusion")
        with gr.Row(equal_height=True):
            model = gr.Dropdown(session.names("checkpoint"), value=session.default_checkpoint(),
                                label="Stable Diffusion checkpoint", scale=4, elem_id="checkpoint")
            refresh = gr.Button("🔄", scale=0, min_width=50, elem_id="refresh")
        with gr.Tabs() as tabs:
            with gr.Tab("txt2img", id="txt2img"):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative_prompt")
                with gr.Row():  # A1111's extra networks, as pickers that write the prompt syntax
                    lora_pick = gr.Dropdown([None, *session.names("lora")], value=None, label="Add a LoRA to the prompt",
                                            elem_id="add_lora")
                    embedding_pick = gr.Dropdown([None, *session.names("embedding")], value=None,
                                                 label="Add an embedding to the negative prompt", elem_id="add_embedding")
                with gr.Row():
                    with gr.Column(scale=3):
                        units = [unit_widgets(number, session) for number in range(1, UNITS + 1)]
                        crop = gr.Radio(["center", "pad"], value="center", label="Reference crop (all units)")
                        with gr.Accordion("ControlNet unit", open=False):
                            controlnet = gr.Dropdown([None, *session.names("controlnet")], value=None,
                                                     label="ControlNet")
                            control_image = gr.Image(type="filepath", label="Control image", height=160)
                    with gr.Column(scale=2):
                        with gr.Row():
                            sampler = gr.Dropdown(SAMPLER_CHOICES, value=MODEL_DEFAULT, label="Sampling method",
                                                  elem_id="sampler")
                            steps = gr.Slider(1, 150, 20, step=1, label="Sampling steps", elem_id="steps")
                        with gr.Row():
                            width = gr.Number(0, label="Width (0: model's)", precision=0, elem_id="width")
                            height = gr.Number(0, label="Height (0: model's)", precision=0, elem_id="height")
                        with gr.Row():
                            guidance = gr.Slider(1, 30, 7, step=0.5, label="CFG scale")
                            num_images = gr.Slider(1, 16, 1, step=1, label="Batch count (images)",
                                                     elem_id="num_images")
                        with gr.Row(equal_height=True):
                            seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed", scale=4)
                            dice = gr.Button("🎲", min_width=50, scale=0, elem_id="random_seed")
                            reuse = gr.Button("♻️", min_width=50, scale=0, elem_id="reuse_seed")
                        txt2img = result_widgets("")
            with gr.Tab("img2img", id="img2img"):
                gr.Markdown("Starts from an image. The prompt, IP-Adapter units, ControlNet and sampling settings "
                            "are the txt2img tab's. Paint over the image to inpaint only there.")
                with gr.Row():
                    with gr.Column(scale=3):
                        init_image = gr.Image(type="filepath", label="Init image", height=220, elem_id="init_image")
                        inpaint = gr.ImageEditor(label="Inpainting mask: paint what to repaint (blank: all of it)",
                                                 type="numpy", value=blank_canvas(), canvas_size=(CANVAS, CANVAS),
                                                 height=320, sources=(), brush=WHITE_BRUSH, elem_id="inpaint")
                        strength = gr.Slider(0.05, 1, 0.75, step=0.05, label="Denoising strength")
                    with gr.Column(scale=2):
                        img2img = result_widgets("img2img_")
            with gr.Tab("PNG info", id="pnginfo"):
                dropped = gr.Image(type="filepath", label="Drop an image written by imprompt or A1111",
                                   elem_id="png_drop", image_mode=None, height=260)
                parameters = gr.Textbox(label="Parameters", lines=6, elem_id="png_parameters")
                send = gr.Button("Send to txt2img", elem_id="send_to_txt2img")
            with gr.Tab("Batch", id="batch"):
                gr.Markdown("Grids, prompt matrices and batch workflows come with the toolbox issue (`imprompt "
                            "batch` and `imprompt merge` are there already on the command line); until then, "
                            "script them against the API (`/docs`).")

        form = FormWidgets(model, prompt, negative, units, crop, controlnet, control_image, sampler, steps, guidance,
                           seed, width, height, num_images, init_image, inpaint, strength)
        job_id, last_seed = gr.State(None), gr.State(-1)  # per browser tab: this tab's job and seed

        def generator(results: ResultWidgets, mode_img2img: bool):
            def generate(data: dict):
                for text, paths, info, job in session.run(form.read(data, mode_img2img)):
                    yield {results.status: text, results.gallery: paths, results.info: info,
                           job_id: job.id if job else gr.skip(),
                           last_seed: job.seed if job and paths is not None else gr.skip()}
            return generate

        def cancel_job(current: str | None) -> None:
            job: Job | None = engine.job(current) if current else None
            if job is not None:
                job.cancel()

        for results, mode_img2img in ((txt2img, False), (img2img, True)):
            results.generate.click(generator(results, mode_img2img), form.components(),
                                   [results.status, results.gallery, results.info, job_id, last_seed])
            results.cancel.click(cancel_job, job_id, None)
        dice.click(lambda: -1, None, seed)
        reuse.click(lambda value: value, last_seed, seed)
        init_image.change(lambda path: {"background": path, "layers": [], "composite": path} if path
                          else blank_canvas(), init_image, inpaint)

        pickers = [model, *(u.adapter for u in units), *(u.image_encoder for u in units), controlnet, lora_pick,
                   embedding_pick]

        def refreshed() -> list:
            engine.refresh()
            encoders = [None, *session.names("image_encoder")]
            return [gr.update(choices=session.names("checkpoint")),
                    *(gr.update(choices=session.adapter_choices()) for _ in units),
                    *(gr.update(choices=encoders) for _ in units),
                    gr.update(choices=[None, *session.names("controlnet")]),
                    gr.update(choices=[None, *session.names("lora")]),
                    gr.update(choices=[None, *session.names("embedding")])]

        lora_pick.select(lambda text, name: (add_network(text, "lora", name), None), [prompt, lora_pick],
                         [prompt, lora_pick])
        embedding_pick.select(lambda text, name: (add_network(text, "embedding", name), None),
                              [negative, embedding_pick], [negative, embedding_pick])
        refresh.click(refreshed, None, pickers)
        dropped.change(png_info_text, dropped, parameters)
        send.click(lambda text: [*send_back(text), gr.Tabs(selected="txt2img")], parameters,
                   [prompt, negative, steps, guidance, seed, sampler, width, height, tabs])
    return ui
