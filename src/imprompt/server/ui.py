"""The web UI (Gradio), laid out as AUTOMATIC1111 / Forge users know it: a checkpoint picker, txt2img with
IP-Adapter units like the ControlNet extension's and ControlNet units with their preprocessors, img2img /
inpainting, sampling settings, a gallery whose PNGs carry their parameters, and a PNG info tab that sends settings back.

The page holds no logic of its own: :func:`imprompt.server.form.form_request` turns the form into a GenerateRequest (pure, so
it is tested without a browser) and the engine runs it like any API request. Results are written as PNGs
(with their ``parameters`` text) into a temporary folder the UI owns, never into the user's folders.
Widgets are read by name (:class:`UnitWidgets`, :class:`FormWidgets`), not by position in a long
argument list, so adding a field cannot shift the others. What the page asks of the engine (pickers,
uploads, the Generate and Tune jobs) is :class:`imprompt.server.ui_session.Session`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ui_session import Session  # first: it keeps gradio from calling home

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..adapter.layers import PRESETS  # noqa: E402
from ..generation.pnginfo import parse_parameters  # noqa: E402
from ..generation.preprocess import PREPROCESSORS  # noqa: E402
from ..generation.schedulers import SCHEDULERS  # noqa: E402
from ..generation.text_diff import DEFAULT_STRENGTH  # noqa: E402
from .engine import Engine, Job  # noqa: E402
from .form import (CANVAS, MAX_TUNE_STEPS, MODEL_DEFAULT, ControlForm, Form, UnitForm, add_network,  # noqa: E402, F401
                   form_request, painted_mask)

UNITS = 3  # adapter units shown (each may hold several references; disabled ones are left out)
CONTROL_UNITS = 2  # ControlNet units shown (those without a ControlNet chosen are left out)
LAYER_CHOICES = [*((name.replace("_", " "), name) for name in PRESETS), ("custom (below)", "custom")]
SAMPLER_CHOICES = [(MODEL_DEFAULT, MODEL_DEFAULT), *((s.a1111, key) for key, s in SCHEDULERS.items())]
GUARD_PREVIEWS = 2  # the tuning guard's previews per feature set, as measured in docs/tuning.md
WHITE_BRUSH = gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed")  # white = the region


def blank_canvas() -> np.ndarray:
    return np.zeros((CANVAS, CANVAS, 3), np.uint8)


def png_info_text(path: str | None) -> str:
    if not path:
        return ""
    with Image.open(path) as image:
        return str(image.info.get("parameters", ""))


def send_back(text: str) -> list:
    """PNG info -> the form's prompt, negative prompt, steps, CFG, image CFG (emptied where absent: one scale),
    seed, sampler, width, height (unchanged where absent)."""
    values = parse_parameters(text) if text else {}
    sampler = next((key for key, s in SCHEDULERS.items() if s.a1111 == values.get("Sampler")), None)
    width, _, height = values.get("Size", "").partition("x")
    return [values.get("Prompt", gr.skip()) if values else gr.skip(),
            values.get("Negative prompt", gr.skip()),
            int(values["Steps"]) if values.get("Steps", "").isdigit() else gr.skip(),
            float(values["CFG scale"]) if "CFG scale" in values else gr.skip(),
            float(values["Image CFG scale"]) if "Image CFG scale" in values else None,
            int(values["Seed"]) if values.get("Seed", "").isdigit() else gr.skip(),
            sampler or gr.skip(),
            int(width) if width.isdigit() else gr.skip(), int(height) if height.isdigit() else gr.skip()]


@dataclass
class TuneWidgets:
    """A unit's one-image tuning: ``imprompt tune`` on its references, the result put in its saved embeds."""

    steps: gr.Number
    caption: gr.Textbox
    guard: gr.Checkbox
    button: gr.Button
    status: gr.Markdown


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
    embeds: gr.File
    text_diff: gr.Textbox
    text_diff_strength: gr.Slider
    tune: TuneWidgets | None = None

    def components(self) -> list:
        """The form's inputs (the tuning widgets have their own button)."""
        return [v for k, v in vars(self).items() if k != "tune"]

    def read(self, data: dict) -> UnitForm:
        return UnitForm(bool(data[self.enabled]), data[self.adapter], [str(f) for f in data[self.images] or []],
                        float(data[self.scale]), data[self.layers], data[self.custom_layers] or "",
                        data[self.weights] or "", data[self.image_encoder] or None, float(data[self.start]),
                        float(data[self.end]), painted_mask(data[self.mask]), data[self.negative_image],
                        str(data[self.embeds]) if data[self.embeds] else None, data[self.text_diff] or "",
                        float(data[self.text_diff_strength]))


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
        with gr.Accordion("More: custom layers, per-image weights, encoder, negative image, saved embeds, text diff",
                          open=False):
            with gr.Row():
                custom = gr.Textbox(label="Custom layers (block=w,...,default=w)", scale=2)
                weights = gr.Textbox(label="Per-image weights (w1,w2,...)", scale=1)
                encoder = gr.Dropdown([None, *session.names("image_encoder")], value=None,
                                      label="Image encoder (empty: the one it needs)", scale=1)
            with gr.Row():
                negative_image = gr.Image(type="filepath", label="Negative image", height=120)
                embeds = gr.File(file_types=[".safetensors", ".ipadpt"], height=120,
                                 label="Saved embeds (imprompt encode / tune), instead of reference images")
            # DALL-E 2's text diff (imprompt.generation.text_diff): the image prompt itself is told what changes.
            with gr.Row():
                text_diff = gr.Textbox(label="Text diff, base adapters: 'FROM -> TO' (FROM describes the reference)",
                                       placeholder="blue background -> green background", scale=3,
                                       elem_id=f"unit{number - 1}_text_diff")
                text_diff_strength = gr.Slider(0, 1, DEFAULT_STRENGTH, step=0.05, label="Text diff strength", scale=1)
            # E4T-style tuning (docs/tuning.md): a few steps on the references themselves, seconds on the toy
            # model; the result fills the saved embeds above, which then replace the references.
            with gr.Row(equal_height=True):
                tune_steps = gr.Number(15, label="Tuning steps", precision=0, minimum=1, maximum=MAX_TUNE_STEPS,
                                       min_width=100, scale=1, elem_id=f"unit{number - 1}_tune_steps")
                caption = gr.Textbox(label="Tuning caption (empty: the image alone explains the references)",
                                     scale=3)
                guard = gr.Checkbox(False, label=f"Guard: keep the tuning only if {GUARD_PREVIEWS} previews look "
                                    "closer to the references", scale=2)
                button = gr.Button("Tune on the references", scale=1, elem_id=f"unit{number - 1}_tune")
            status = gr.Markdown("", elem_id=f"unit{number - 1}_tune_status")
    return UnitWidgets(enabled, adapter, images, scale, layers, custom, weights, encoder, start, end, mask,
                       negative_image, embeds, text_diff, text_diff_strength,
                       TuneWidgets(tune_steps, caption, guard, button, status))


@dataclass
class ControlWidgets:
    controlnet: gr.Dropdown
    image: gr.Image
    preprocess: gr.Dropdown
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    resolution: gr.Number
    threshold_a: gr.Number
    threshold_b: gr.Number

    def components(self) -> list:
        return list(vars(self).values())

    def read(self, data: dict) -> ControlForm:
        return ControlForm(data[self.controlnet] or None, data[self.image], data[self.preprocess] or "none",
                           float(data[self.scale]), float(data[self.start]), float(data[self.end]),
                           int(data[self.resolution] if data[self.resolution] is not None else -1),
                           float(data[self.threshold_a] if data[self.threshold_a] is not None else -1),
                           float(data[self.threshold_b] if data[self.threshold_b] is not None else -1))


def control_widgets(number: int, session: Session) -> ControlWidgets:
    """One ControlNet unit's widgets: the ControlNet, its image and preprocessor (the extension's names and
    threshold meanings, imprompt.generation.preprocess), weight and steps."""
    with gr.Accordion(f"ControlNet unit {number}", open=False, elem_id=f"control{number - 1}"):
        with gr.Row():
            controlnet = gr.Dropdown([None, *session.names("controlnet")], value=None, label="ControlNet",
                                     elem_id=f"control{number - 1}_model")
            preprocess = gr.Dropdown(list(PREPROCESSORS), value="none", label="Preprocessor",
                                     elem_id=f"control{number - 1}_preprocessor")
        image = gr.Image(type="filepath", label="Control image", height=160)
        with gr.Row():
            scale = gr.Slider(0, 2, 1, step=0.05, label="Weight", min_width=140)
            start = gr.Slider(0, 1, 0, step=0.05, label="Start", min_width=140)
            end = gr.Slider(0, 1, 1, step=0.05, label="End", min_width=140)
        with gr.Row():
            resolution = gr.Number(-1, label="Preprocessor resolution (-1: as given)", precision=0)
            threshold_a = gr.Number(-1, label="Threshold A (-1: default; canny low)")
            threshold_b = gr.Number(-1, label="Threshold B (-1: default; canny high)")
    return ControlWidgets(controlnet, image, preprocess, scale, start, end, resolution, threshold_a, threshold_b)


@dataclass
class FormWidgets:
    model: gr.Dropdown
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    units: list[UnitWidgets]
    crop: gr.Radio
    controls: list[ControlWidgets]
    sampler: gr.Dropdown
    steps: gr.Slider
    guidance: gr.Slider
    seed: gr.Number
    width: gr.Number
    height: gr.Number
    num_images: gr.Slider
    image_guidance: gr.Number | None = None
    init_image: gr.Image | None = None  # the img2img tab's, set once it is built
    inpaint: gr.ImageEditor | None = None
    strength: gr.Slider | None = None

    def components(self) -> set:
        singles = [v for k, v in vars(self).items() if k not in ("units", "controls") and v is not None]
        return {*singles, *(c for unit in [*self.units, *self.controls] for c in unit.components())}

    def read(self, data: dict, img2img: bool) -> Form:
        """The form; img2img's inputs only for its own Generate button (A1111's tabs are separate modes)."""
        seed = data[self.seed]
        return Form(data[self.model], data[self.prompt] or "", data[self.negative_prompt] or "",
                    [unit.read(data) for unit in self.units], data[self.crop],
                    [control.read(data) for control in self.controls], data[self.init_image] if img2img else None,
                    painted_mask(data[self.inpaint]) if img2img else None, float(data[self.strength]),
                    data[self.sampler], int(data[self.steps]), float(data[self.guidance]),
                    int(seed) if seed is not None else -1, int(data[self.width] or 0), int(data[self.height] or 0),
                    int(data[self.num_images]), data[self.image_guidance])


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
                        controls = [control_widgets(number, session) for number in range(1, CONTROL_UNITS + 1)]
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
                            image_guidance = gr.Number(None, label="Image CFG scale (empty: the CFG scale)",
                                                       elem_id="image_guidance", minimum=0, maximum=30)
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

        form = FormWidgets(model, prompt, negative, units, crop, controls, sampler, steps, guidance,
                           seed, width, height, num_images, image_guidance, init_image, inpaint, strength)
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

        def tuner(number: int, unit: UnitWidgets):
            def tune(data: dict):
                guard = GUARD_PREVIEWS if data[unit.tune.guard] else 0
                for text, path in session.tune(data[model], unit.read(data), number, data[unit.tune.caption] or "",
                                               int(data[unit.tune.steps] or 0), guard):
                    yield {unit.tune.status: text, unit.embeds: path if path is not None else gr.skip()}
            return tune

        for number, unit in enumerate(units, 1):
            inputs = {model, *unit.components(), unit.tune.caption, unit.tune.steps, unit.tune.guard}
            unit.tune.button.click(tuner(number, unit), inputs, [unit.tune.status, unit.embeds])
        for results, mode_img2img in ((txt2img, False), (img2img, True)):
            results.generate.click(generator(results, mode_img2img), form.components(),
                                   [results.status, results.gallery, results.info, job_id, last_seed])
            results.cancel.click(cancel_job, job_id, None)
        dice.click(lambda: -1, None, seed)
        reuse.click(lambda value: value, last_seed, seed)
        init_image.change(lambda path: {"background": path, "layers": [], "composite": path} if path
                          else blank_canvas(), init_image, inpaint)

        pickers = [model, *(u.adapter for u in units), *(u.image_encoder for u in units),
                   *(c.controlnet for c in controls), lora_pick, embedding_pick]

        def refreshed() -> list:
            engine.refresh()
            encoders = [None, *session.names("image_encoder")]
            return [gr.update(choices=session.names("checkpoint")),
                    *(gr.update(choices=session.adapter_choices()) for _ in units),
                    *(gr.update(choices=encoders) for _ in units),
                    *(gr.update(choices=[None, *session.names("controlnet")]) for _ in controls),
                    gr.update(choices=[None, *session.names("lora")]),
                    gr.update(choices=[None, *session.names("embedding")])]

        lora_pick.select(lambda text, name: (add_network(text, "lora", name), None), [prompt, lora_pick],
                         [prompt, lora_pick])
        embedding_pick.select(lambda text, name: (add_network(text, "embedding", name), None),
                              [negative, embedding_pick], [negative, embedding_pick])
        refresh.click(refreshed, None, pickers)
        dropped.change(png_info_text, dropped, parameters)
        send.click(lambda text: [*send_back(text), gr.Tabs(selected="txt2img")], parameters,
                   [prompt, negative, steps, guidance, image_guidance, seed, sampler, width, height, tabs])
    return ui
