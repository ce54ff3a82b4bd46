"""The web UI (Gradio), laid out as AUTOMATIC1111 / Forge users know it: a prompt box, IP-Adapter units
like the ControlNet extension's, a ControlNet unit, img2img / inpainting inputs, sampling settings, a
gallery whose PNGs carry their parameters, and a PNG info tab that sends settings back to the form.

The page holds no logic of its own: :func:`form_request` turns the form into a GenerateRequest (pure, so
it is tested without a browser) and the engine runs it like any API request. Results are written as PNGs
(with their ``parameters`` text) into a temporary folder the UI owns and removes at exit, never into the
user's folders.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed machine

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..adapter.layers import PRESETS  # noqa: E402
from ..errors import one_line  # noqa: E402
from ..generation.pnginfo import parse_parameters, save_png  # noqa: E402
from ..generation.request import GenerateRequest  # noqa: E402
from ..generation.schedulers import SCHEDULERS  # noqa: E402
from .engine import Engine  # noqa: E402
from .uploads import decode_upload  # noqa: E402

UNITS = 3  # adapter units shown (each may hold several references; disabled ones are left out)
PER_UNIT = 12  # form fields per unit
MODEL_DEFAULT = "(model default)"
LAYER_CHOICES = [*PRESETS, "custom"]  # all, style, composition, style_and_composition, custom
POLL_SECONDS = 0.2
WHITE_BRUSH = gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed")  # white = the region


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
    model: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    units: list[UnitForm] = field(default_factory=list)
    crop: str = "center"
    controlnet: str | None = None
    control_image: str | None = None
    init_image: str | None = None
    inpaint_mask: Image.Image | None = None
    strength: float = 0.75
    sampler: str = MODEL_DEFAULT
    steps: int = 20
    guidance: float = 7.0
    seed: int = -1
    width: int = 0  # 0: the model's own
    height: int = 0
    num_images: int = 1


def form_request(form: Form, lookup, read_image, add_image) -> GenerateRequest:
    """The GenerateRequest of a filled form. ``lookup(name, kind)`` -> a model path found by name;
    ``read_image(path) -> image``; ``add_image(image, name) -> reference name`` files an image for the
    engine (the name is what PNG info shows)."""
    values: dict[str, list[str]] = {k: [] for k in ("adapter", "image", "scale", "layers", "start", "end", "mask",
                                                    "negative_image", "weights", "image_encoder")}
    units = [u for u in form.units if u.enabled]
    masked = any(u.mask is not None for u in units)
    for i, unit in enumerate(units):
        if not unit.adapter:
            raise ValueError(f"IP-Adapter unit {i + 1} is enabled but has no adapter chosen")
        if not unit.images:
            raise ValueError(f"IP-Adapter unit {i + 1} has no reference image; drop one in, or disable the unit")
        values["adapter"].append(lookup(unit.adapter, "adapter"))
        for path in unit.images:
            values["image"].append(f"{i}={add_image(read_image(path), Path(path).name)}")
            if masked:  # the unit's painted region applies to each of its references; no mask: everywhere
                mask = unit.mask if unit.mask is not None else Image.new("L", (64, 64), 255)
                values["mask"].append(add_image(mask, f"unit{i + 1}-mask.png"))
        values["scale"].append(f"{i}={unit.scale:g}")
        if unit.layers == "custom":
            if not unit.custom_layers.strip():
                raise ValueError(f"IP-Adapter unit {i + 1}: custom layers need 'block=weight,...', e.g. "
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
    where Gradio flattened them, the pixels where the composite differs from the background. None if
    nothing was painted."""
    if not isinstance(value, dict):
        return None
    painted = None
    for layer in value.get("layers") or []:
        array = np.asarray(layer) if layer is not None else None
        if array is not None and array.ndim == 3 and array.shape[2] == 4:
            painted = array[:, :, 3] > 0 if painted is None else painted | (array[:, :, 3] > 0)
    background, composite = value.get("background"), value.get("composite")
    if background is not None and composite is not None:
        b, c = np.asarray(background), np.asarray(composite)
        if b.shape[:2] == c.shape[:2]:
            channels = min(b.shape[2] if b.ndim == 3 else 1, c.shape[2] if c.ndim == 3 else 1, 3)
            diff = np.any(b.reshape(*b.shape[:2], -1)[:, :, :channels] != c.reshape(*c.shape[:2], -1)[:, :, :channels],
                          axis=2)
            painted = diff if painted is None else painted | diff
    if painted is None or not painted.any():
        return None
    return Image.fromarray((painted * 255).astype(np.uint8), "L")


class Session:
    """What the page needs from the engine, plus the folder its result PNGs are served from."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.folder = Path(tempfile.mkdtemp(prefix="imprompt-ui-"))
        atexit.register(shutil.rmtree, self.folder, True)

    def names(self, kind: str) -> list[str]:
        return [e.name for e in self.engine.catalog.of_kind(kind) if e.usable]

    def adapter_choices(self) -> list[tuple[str, str]]:
        return [(f"{e.name} ({e.info.details.get('variant', '?')})", e.name)
                for e in self.engine.catalog.of_kind("adapter") if e.usable]

    def lookup(self, name: str, kind: str) -> str:
        return str(self.engine.catalog.find(name, kind).path)

    def read(self, path: str) -> Image.Image:
        config = self.engine.config
        return decode_upload(Path(path).read_bytes(), field=Path(path).name, max_bytes=config.max_upload_bytes,
                             max_pixels=config.max_pixels)

    def run(self, form: Form):
        """Submit, then yield (progress text, gallery paths, parameters text, job) until the job is done.
        The job travels to the caller (each browser tab keeps its own in a gr.State), never on the session."""
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
            raise gr.Error(one_line(err)) from None
        while not job.done:
            yield f"step {job.step} of {job.total_steps} ({job.state})", None, "", job
            time.sleep(POLL_SECONDS)
        if job.state == "failed":
            raise gr.Error(job.error or "the generation failed")
        if job.state == "cancelled":
            yield "cancelled", None, "", job
            return
        paths = []
        for n, item in enumerate(job.images):
            paths.append(str(save_png(item.image, self.folder / f"{job.id}-{n}-{item.seed}.png", item.parameters)))
        yield (f"done: {len(paths)} image(s), step {job.total_steps} of {job.total_steps}", paths,
               "\n\n".join(r.parameters for r in job.images), job)


def png_info_text(path: str | None) -> str:
    if not path:
        return ""
    with Image.open(path) as image:
        return str(image.info.get("parameters", ""))


def send_back(text: str) -> list:
    """PNG info -> the form's prompt, negative prompt, steps, CFG, seed, sampler (unchanged where absent)."""
    values = parse_parameters(text) if text else {}
    sampler = next((key for key, c in SCHEDULERS.items() if c.a1111 == values.get("Sampler")), None)
    size = values.get("Size", "")
    width, _, height = size.partition("x")
    return [values.get("Prompt", gr.skip()) if values else gr.skip(),
            values.get("Negative prompt", gr.skip()),
            int(values["Steps"]) if values.get("Steps", "").isdigit() else gr.skip(),
            float(values["CFG scale"]) if "CFG scale" in values else gr.skip(),
            int(values["Seed"]) if values.get("Seed", "").isdigit() else gr.skip(),
            sampler or gr.skip(),
            int(width) if width.isdigit() else gr.skip(), int(height) if height.isdigit() else gr.skip()]


def build_ui(engine: Engine) -> gr.Blocks:
    session = Session(engine)
    with gr.Blocks(title="imprompt") as ui:
        gr.Markdown("## imprompt: image prompts for Stable Diffusion")
        with gr.Tab("txt2img / img2img", id="generate"):
            with gr.Row():
                model = gr.Dropdown(session.names("checkpoint"), label="Checkpoint", scale=4,
                                    value=None, allow_custom_value=False)
                refresh = gr.Button("Refresh", scale=0, min_width=80, elem_id="refresh")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative_prompt")
            with gr.Row():
                with gr.Column(scale=3):
                    unit_fields = []
                    for i in range(UNITS):
                        with gr.Accordion(f"IP-Adapter unit {i + 1}", open=i == 0):
                            enabled = gr.Checkbox(i == 0, label="Enable", elem_id=f"unit{i}_enabled")
                            choices = session.adapter_choices()
                            adapter = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Adapter")
                            refs = gr.File(file_count="multiple", file_types=["image"], label="Reference image(s)",
                                           elem_id=f"unit{i}_refs")
                            with gr.Row():
                                scale = gr.Slider(0, 2, 0.6, step=0.05, label="Weight")
                                layers = gr.Dropdown(LAYER_CHOICES, value="all", label="Layers")
                            with gr.Row():
                                custom = gr.Textbox(label="Custom layers (block=w,...,default=w)", scale=2)
                                weights = gr.Textbox(label="Per-image weights (w1,w2,...)", scale=1)
                                encoder = gr.Dropdown([None, *session.names("image_encoder")], value=None,
                                                      label="Image encoder (default: the one it needs)", scale=1)
                            with gr.Row():
                                start = gr.Slider(0, 1, 0, step=0.05, label="Start")
                                end = gr.Slider(0, 1, 1, step=0.05, label="End")
                            mask = gr.ImageEditor(label="Region mask: paint where this unit acts", type="numpy",
                                                  value=np.zeros((256, 256, 3), np.uint8), canvas_size=(256, 256),
                                                  height=300, elem_id=f"unit{i}_mask", sources=(), brush=WHITE_BRUSH)
                            negative_image = gr.Image(type="filepath", label="Negative image", height=120)
                            unit_fields += [enabled, adapter, refs, scale, layers, custom, weights, encoder, start, end, mask,
                                            negative_image]
                    crop = gr.Radio(["center", "pad"], value="center", label="Reference crop")
                    with gr.Accordion("ControlNet unit", open=False):
                        controlnet = gr.Dropdown([None, *session.names("controlnet")], value=None, label="ControlNet")
                        control_image = gr.Image(type="filepath", label="Control image", height=160)
                    with gr.Accordion("img2img / inpainting", open=False):
                        init_image = gr.Image(type="filepath", label="Init image (img2img)", height=160)
                        inpaint = gr.ImageEditor(label="Inpainting mask: paint what to repaint", type="numpy",
                                                 value=np.zeros((256, 256, 3), np.uint8), canvas_size=(256, 256),
                                                 height=300, sources=(), brush=WHITE_BRUSH)
                        strength = gr.Slider(0.05, 1, 0.75, step=0.05, label="Denoising strength")
                with gr.Column(scale=2):
                    with gr.Row():
                        sampler = gr.Dropdown([MODEL_DEFAULT, *SCHEDULERS], value=MODEL_DEFAULT, label="Sampler")
                        steps = gr.Slider(1, 150, 20, step=1, label="Steps", elem_id="steps")
                    with gr.Row():
                        guidance = gr.Slider(1, 30, 7, step=0.5, label="CFG scale")
                        num_images = gr.Slider(1, 16, 1, step=1, label="Images")
                    with gr.Row():
                        width = gr.Number(0, label="Width (0: model's)", precision=0)
                        height = gr.Number(0, label="Height (0: model's)", precision=0)
                    with gr.Row():
                        seed = gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed")
                        dice = gr.Button("Random", min_width=70, scale=0, elem_id="random_seed")
                        reuse = gr.Button("Reuse last", min_width=90, scale=0, elem_id="reuse_seed")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel = gr.Button("Cancel")
                    status = gr.Markdown("", elem_id="status")
                    gallery = gr.Gallery(label="Results", columns=2, height=320, elem_id="gallery", format="png")
                    info = gr.Textbox(label="PNG info", lines=4, elem_id="info")
        with gr.Tab("PNG info", id="pnginfo"):
            dropped = gr.Image(type="filepath", label="Drop an image written by imprompt or A1111", elem_id="png_drop",
                               image_mode=None)
            parameters = gr.Textbox(label="Parameters", lines=6, elem_id="png_parameters")
            send = gr.Button("Send to txt2img", elem_id="send_to_txt2img")
        with gr.Tab("Batch"):
            gr.Markdown("Grids, prompt matrices and batch workflows come with the toolbox (`imprompt merge` is "
                        "there already); until then, script them against the API (`/docs`).")

        def run(model_name, prompt_text, negative_text, *rest):
            fields = list(rest[: len(unit_fields)])
            (crop_v, cn, cn_image, init, inpaint_v, strength_v, sampler_v, steps_v, guidance_v, n, w, h,
             seed_v) = rest[len(unit_fields):]
            units = []
            for k in range(UNITS):
                e, a, files, s, lay, cus, ws, enc, st, en, m, neg = fields[PER_UNIT * k: PER_UNIT * (k + 1)]
                units.append(UnitForm(bool(e), a, [str(f) for f in (files or [])], float(s), lay, cus or "", ws or "",
                                      enc, float(st), float(en), painted_mask(m), neg))
            form = Form(model_name, prompt_text or "", negative_text or "", units, crop_v, cn, cn_image, init,
                        painted_mask(inpaint_v), strength_v, sampler_v, steps_v, guidance_v,
                        int(seed_v) if seed_v is not None else -1, int(w or 0), int(h or 0), int(n))
            for text, paths, parameters, job in session.run(form):
                yield text, paths, parameters, job.id, job.seed if paths is not None else gr.skip()

        inputs = [model, prompt, negative, *unit_fields, crop, controlnet, control_image, init_image, inpaint,
                  strength, sampler, steps, guidance, num_images, width, height, seed]
        job_id, last_seed = gr.State(None), gr.State(-1)  # per browser tab: this tab's job and seed
        generate.click(run, inputs, [status, gallery, info, job_id, last_seed])

        def cancel_job(current: str | None) -> None:
            job = engine.job(current) if current else None
            if job is not None:
                job.cancel()

        cancel.click(cancel_job, job_id, None)
        dice.click(lambda: random.randrange(2**32), None, seed)
        reuse.click(lambda value: value, last_seed, seed)

        def refreshed():
            engine.refresh()
            return gr.update(choices=session.names("checkpoint"))

        refresh.click(refreshed, None, model)
        dropped.change(png_info_text, dropped, parameters)
        send.click(send_back, parameters, [prompt, negative, steps, guidance, seed, sampler, width, height]).then(
            None, None, None, js="() => { document.querySelector('button[role=tab]')?.click(); }")
    return ui
