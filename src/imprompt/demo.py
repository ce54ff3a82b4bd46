"""``make demo``: the main job on the bundled toy world, on a CPU.

For a few shipped reference images, it generates with the image prompt alone, with two
image + text prompts (the text changes the background, or the colour; the same words as a text diff of
the image prompt, :mod:`imprompt.generation.text_diff`), and with the toy ControlNet
(the layout of another shipped picture, its silhouette read by the ``toy_silhouette`` preprocessor,
and a text naming that picture's shape; the reference gives the rest). It writes the PNGs (with their
parameters) and one labelled contact sheet, and prints how well each generation matches: the
attribute reader checks every attribute against what the reference, the text and the control ask for.

Measured with ``time .venv/bin/python -m imprompt.demo`` on an idle 2-core CPU: 29 s in all, of which
about 22 s load the models and generate the 16 images (the time the demo prints) and the rest imports
torch, diffusers and transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import add_arguments, from_namespace, option
from .errors import guarded
from .toy import PACKAGE_DIR, toy_available, toy_paths
from .toy.judge import CONTENT, Attributes, change_background, change_color, content_hits, read


def plan(reference: Attributes, rng: random.Random) -> list[tuple[str, str, str, Attributes]]:
    """(label, text, the text's words for the reference as it is, expected attributes): image alone, then a
    text that changes one attribute."""
    edits = [change_background(reference, rng), change_color(reference, rng)]
    return [("image only", "", "", reference)] + [(f"+ '{e.text}'", e.text, e.source, e.expected) for e in edits]


def layout_partner(catalogue: list[dict], i: int) -> int:
    """The first shipped reference after ``i`` (cyclically) with another shape: its layout is the control."""
    for k in range(1, len(catalogue)):
        j = (i + k) % len(catalogue)
        if catalogue[j]["shape"] != catalogue[i]["shape"]:
            return j
    raise ValueError("the shipped references all have one shape; the ControlNet column needs two")


@dataclass
class DemoConfig:
    output: str = field(default="outputs/demo", metadata=option("folder for the PNGs and the contact sheet"))
    references: int = field(default=4, metadata=option("how many shipped references to use"))
    # With a text diff the image prompt at full scale follows both the text and the reference most often (42% all
    # four, against 22% at scale 0.5 without one, the best without); guidance 3 is the toy model's measured
    # setting (docs/toy-results.md, section 3 "Text diffs"; the model card's quality numbers).
    scale: float = field(default=1.0, metadata=option("image prompt scale for the image + text prompts"))
    text_diff: float = field(default=0.3, metadata=option(
        "strength of the image + text prompts' text diff (reference's words -> the text); 0: none (then --scale 0.5 "
        "is the best setting)"))
    steps: int = field(default=20, metadata=option("denoising steps"))
    guidance: float = field(default=3.0, metadata=option("classifier-free guidance scale"))
    # The measured setting of the ControlNet column: image prompt 1, control 1.5, a text naming the control's shape
    # (docs/toy-results.md, section 6: the control's shape 86%, size and position 97-100%, the reference's colour 94%)
    control_scale: float = field(default=1.5, metadata=option("ControlNet conditioning scale of the ControlNet column"))
    control_image_scale: float = field(default=1.0, metadata=option("image prompt scale of the ControlNet column"))

    def check(self) -> None:
        if not 1 <= self.references <= 16:
            raise ValueError(f"references must be 1 to 16, got {self.references}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0 <= self.text_diff <= 1:
            raise ValueError(f"text_diff must be 0 (none) to 1, got {self.text_diff}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imprompt demo", description=__doc__.split("\n")[0])
    add_arguments(parser, DemoConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    return guarded("demo", lambda: run(from_namespace(DemoConfig, namespace)))


def run(args: DemoConfig) -> int:
    import torch

    from . import GenerationSettings, ImageEncoder, ImagePrompt, attach, generate, load_adapter, load_image, load_pipeline
    from .files import check_writable_folder
    from .generation.pipelines import load_controlnet, pipeline_class
    from .generation.pnginfo import format_parameters, save_png
    from .generation.text_diff import TextDiff, TextTower, text_diff
    from .sheets import contact_sheet
    from .toy.reader import silhouette_of

    args.check()
    check_writable_folder(args.output, "--output")

    paths = toy_paths()
    if not toy_available():
        # Only in a checkout whose toy models were not built yet: say what would run, and how to build.
        print(f"The toy models are not in {PACKAGE_DIR} yet. Build them with `imprompt toy build`; the demo then "
              "generates, for a few shipped references, an image-only and two image+text prompts, writes a "
              "contact sheet and prints how well each generation matches its reference.")
        return 0
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    pipe = load_pipeline(paths["model"])
    adapter = load_adapter(paths["adapter"], torch.float32)
    encoder = ImageEncoder.from_pretrained(paths["image_encoder"])
    tower = TextTower.from_pretrained(paths["clip"]) if args.text_diff else None  # the image encoder's CLIP partner
    with_control, control_pipe = paths["controlnet"].is_dir(), None  # a package built before it shipped has none
    if with_control:  # from_pipe shares the models: the adapter attached below steers both pipelines
        net = load_controlnet(paths["controlnet"], torch.float32, paths["model"] / "unet" / "config.json")
        control_pipe = pipeline_class(type(pipe).__name__, "text2img", controlnet=True).from_pipe(pipe, controlnet=net)
        control_pipe.set_progress_bar_config(disable=True)
    shipped = json.loads((paths["references"] / "attributes.json").read_text())
    catalogue = shipped[: args.references]
    fields = {f.name for f in dataclasses.fields(Attributes)}
    out = Path(args.output)
    rng = random.Random("imprompt-demo")
    rows, labels, table = [], [], []

    def attributes(item: dict) -> Attributes:
        return Attributes(**{k: v for k, v in item.items() if k in fields})

    def one(attachment, i: int, j: int, name: str, label: str, text: str, scale: float, expected: Attributes,
            reference, control=None, diff: "TextDiff | None" = None):
        """Generation ``j`` of reference ``i`` (seed i), saved with its parameters and scored."""
        settings = GenerationSettings(prompt=text, steps=args.steps, seed=i, guidance=args.guidance,
                                      controlnet_scale=args.control_scale)
        image = generate(control_pipe if control is not None else pipe, attachment, settings,
                         [ImagePrompt([reference], scale=scale, text_diff=diff)], [encoder], control_image=control)[0]
        table.append((name, label, content_hits(read(image), expected)))
        unit = f"Model: toy, Weight: {scale:g}, Images: {name}" + (f", Text diff: {diff.describe()}" if diff else "")
        parameters = {"Steps": args.steps, "CFG scale": args.guidance, "Seed": i,
                      "Size": f"{image.width}x{image.height}", "Model": "imprompt-toy", "IP-Adapter 0": unit}
        if control is not None:
            parameters["ControlNet 0"] = f"Model: toy, Weight: {args.control_scale:g}, Preprocessor: toy_silhouette"
        save_png(image, out / f"{i:02d}-{j}.png", format_parameters(text, "", parameters))
        return image

    with attach(pipe.unet, adapter) as attachment:
        for i, item in enumerate(catalogue):
            reference_attrs = attributes(item)
            reference = load_image(paths["references"] / item["file"])
            row = [reference]
            for j, (label, text, source, expected) in enumerate(plan(reference_attrs, rng)):
                diff = text_diff(tower, source, text, args.text_diff) if text and args.text_diff else None
                row.append(one(attachment, i, j, item["file"], label, text, 1.0 if not text else args.scale,
                               expected, reference, diff=diff))
            if with_control:
                # The layout (shape, size, position) of another shipped picture, the rest from the reference.
                partner = shipped[layout_partner(shipped, i)]
                layout = attributes(partner)
                control = silhouette_of(load_image(paths["references"] / partner["file"]))
                expected = dataclasses.replace(reference_attrs, shape=layout.shape, size=layout.size,
                                               position=layout.position)
                text = f"a {layout.shape}"
                row += [control, one(attachment, i, 3, item["file"], f"+ control + '{text}'", text,
                                     args.control_image_scale, expected, reference, control)]
            rows.append(row)
            labels.append(item["file"].removesuffix(".png"))
    columns = ["reference", "image only", "+ text: background", "+ text: colour"]
    columns += ["control (layout)", "+ control + shape"] if with_control else []
    sheet = contact_sheet(rows, labels, columns, cell=96)
    save_png(sheet, out / "contact_sheet.png", "imprompt demo contact sheet")

    print(f"{'reference':38} {'prompt':28} " + " ".join(f"{a:>10}" for a in CONTENT))
    for name, label, matches in table:
        print(f"{name:38} {label[:28]:28} " + " ".join(f"{'yes' if matches[a] else 'NO':>10}" for a in CONTENT))
    total = sum(sum(m.values()) for _, _, m in table)
    print(f"\n{total}/{len(table) * len(CONTENT)} attributes as asked; wrote {out}/contact_sheet.png and "
          f"{len(table)} images in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
