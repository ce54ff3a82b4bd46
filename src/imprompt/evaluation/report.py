"""The report folder: ``report.md`` (tables), ``results.json`` (everything), contact sheets, the scale plot.

Layout::

    report.md                 one table per metric group, one row per method: mean and 95% interval
    results.json              settings, references, per-method summaries and every sample's scores
    sheets/image_prompt.png   reference | first generation of each method (image alone)
    sheets/multimodal.png     reference | first generation of each method (image + text)
    sheets/<method>.png       reference | all generations (image alone, then image + text)
    sheets/sweep-<method>.png reference | first generation at each scale (image + text)
    scale_sweep.png           CLIP-I and CLIP-T against the ip_adapter scale
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from ..files import atomic_path, write_text
from ..sheets import contact_sheet
from ..toy.judge import ATTRIBUTE_NAMES
from .plot import Panel, Point, line_plot
from .references import Reference
from .scoring import CONTENT

ATTRIBUTES: tuple[str, ...] = ATTRIBUTE_NAMES + ("all",)
EDIT_COLUMNS = {"follows_text": "changed attribute follows the text", "keeps_reference": "others keep the reference",
                "both": "both"}


def write_png(image, path: Path) -> Path:
    """Save ``image`` as a PNG atomically (a reader or a killed run never sees half a file)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def fmt_mean(s: dict) -> str:
    """``0.712 ± 0.013`` (the half-width of the 95% interval); a single value has no interval."""
    if not _finite(s["low"]):
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} ± {(s['high'] - s['low']) / 2:.3f}"


def fmt_proportion(s: dict) -> str:
    """``87.5% (80.1–92.3)``: the Wilson interval is not symmetric, so both ends are shown."""
    return f"{100 * s['mean']:.1f}% ({100 * s['low']:.1f}–{100 * s['high']:.1f})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _clean(value):
    """JSON without NaN (not valid JSON): undefined intervals become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def sweep_passes(method: dict) -> list[tuple[float, dict]]:
    return sorted((p["scale"], p) for k, p in method["passes"].items() if k.startswith("sweep "))


def markdown(results: dict) -> str:
    settings, methods = results["settings"], results["methods"]
    toy = settings["toy_world"]
    n = len(results["references"])
    lines = ["# Evaluation report", "",
             f"- model: `{settings['model']}`", f"- evaluation set: `{settings['data']}`, {n} references, "
             f"{settings['samples']} generations each ({settings['output_size']}x{settings['output_size']} px)",
             f"- sampling: {settings['steps']} steps, guidance {settings['guidance']:g}, scheduler "
             f"{settings['scheduler'] or 'the model’s own'}; {settings['seed_rule']}",
             f"- scoring CLIP: `{settings['clip_model']}`; CLIP-T = {settings['clip_t']}",
             f"- wall time: {results['timing']['wall_seconds']:.1f} s (loading {results['timing']['load_seconds']:.1f} s)",
             "", "Intervals are 95%: CLIP scores ± the half-width of the interval over references (each "
             "reference's samples averaged first); accuracies with the Wilson interval over all generations.", ""]

    lines += ["## Image prompt alone (paper Table 1)", "",
              "Adapters and img2img get the reference with an empty text, text only the reference's caption, "
              "unconditional nothing. CLIP-I: against the reference; CLIP-T: against the reference's caption.", ""]
    lines.append(table(["method", "setting", "CLIP-I", "CLIP-T"], [
        [name, m["description"], fmt_mean(m["passes"]["image_prompt"]["summary"]["clip_i"]),
         fmt_mean(m["passes"]["image_prompt"]["summary"]["clip_t"])] for name, m in methods.items()]))

    if toy:
        lines += ["", "## Attributes of the generation vs the reference (toy world, image alone)", "",
                  "Read from each generation with `imprompt.toy.reader`; `all`: every attribute right.", ""]
        lines.append(table(["method", *ATTRIBUTES], [
            [name, *(fmt_proportion(m["passes"]["image_prompt"]["summary"]["hits"][a]) for a in ATTRIBUTES)]
            for name, m in methods.items()]))

    multimodal = {name: m for name, m in methods.items() if "multimodal" in m["passes"]}
    if multimodal:
        what = ("a text that changes one attribute of the reference (`<colour> background` or `a <colour> <shape>`); "
                "`others` are the other content attributes (" + ", ".join(CONTENT) + ")") if toy else "the reference's caption"
        lines += ["", "## Image + text", "", f"Each method gets the reference and {what}; text only gets the text "
                  "alone. CLIP-T: against that text.", ""]
        header = ["method", "setting", "CLIP-I", "CLIP-T"] + (list(EDIT_COLUMNS.values()) if toy else [])
        rows = []
        for name, m in multimodal.items():
            summary = m["passes"]["multimodal"]["summary"]
            row = [name, m["description"], fmt_mean(summary["clip_i"]), fmt_mean(summary["clip_t"])]
            if toy:
                row += [fmt_proportion(summary["edit_hits"][k]) for k in EDIT_COLUMNS]
            rows.append(row)
        lines.append(table(header, rows))

    swept = {name: sweep_passes(m) for name, m in methods.items() if sweep_passes(m)}
    if swept:
        lines += ["", "## Scale sweep (image + text)", "", "Each ip_adapter method with the image + text prompts above, "
                  "at each scale: higher scales follow the reference (CLIP-I), lower ones the text (CLIP-T).", "",
                  "![CLIP-I and CLIP-T against the adapter scale](scale_sweep.png)", ""]
        header = ["method", "scale", "CLIP-I", "CLIP-T"] + (list(EDIT_COLUMNS.values()) if toy else [])
        rows = []
        for name, points in swept.items():
            for scale, p in points:
                row = [name, f"{scale:g}", fmt_mean(p["summary"]["clip_i"]), fmt_mean(p["summary"]["clip_t"])]
                if toy:
                    row += [fmt_proportion(p["summary"]["edit_hits"][k]) for k in EDIT_COLUMNS]
                rows.append(row)
        lines.append(table(header, rows))

    lines += ["", "## Contact sheets", "", "- [image alone](sheets/image_prompt.png)"]
    if multimodal:
        lines.append("- [image + text](sheets/multimodal.png)")
    lines += [f"- [{name}](sheets/{name}.png)" for name in methods]
    lines += [f"- [{name}, scale sweep](sheets/sweep-{name}.png)" for name in swept]
    lines += ["", "## Time", "", table(["method", "pass", "seconds", "generations / s"], [
        [name, key, f"{p['seconds']:.1f}", f"{p['images_per_second']:.2f}" if p["images_per_second"]
         else f"reused: same generations as {p.get('same_as')}"]
        for name, m in methods.items() for key, p in m["passes"].items()])]
    return "\n".join(lines) + "\n"


def scale_plot(methods: dict):
    panels = [Panel("CLIP-I (vs reference)"), Panel("CLIP-T (vs text)")]
    for name, m in methods.items():
        points = sweep_passes(m)
        if not points:
            continue
        for panel, metric in zip(panels, ("clip_i", "clip_t")):
            panel.series[name] = [Point(scale, p["summary"][metric]["mean"], p["summary"][metric]["low"],
                                        p["summary"][metric]["high"]) for scale, p in points]
    if not panels[0].series:
        return None
    return line_plot(panels, "ip_adapter scale", "CLIP-I and CLIP-T against the adapter scale (image + text; 95% intervals)")


def _label(text: str, width: int = 20) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def write_sheets(folder: Path, result, references: Sequence[Reference]) -> list[Path]:
    images = result.images
    written = []

    def save(name: str, rows, row_labels, column_labels) -> None:
        if rows:
            path = folder / f"{name}.png"
            write_png(contact_sheet(rows, row_labels, column_labels), path)
            written.append(path)

    shown = sorted({i for method in images.values() for kept in method.values() for i in kept})
    for key, name in (("image_prompt", "image_prompt"), ("multimodal", "multimodal")):
        methods = [m for m in images if key in images[m]]
        if not methods:
            continue
        rows = [[references[i].image] + [images[m][key][i][0] for m in methods] for i in shown]
        labels = [_label(references[i].name if key == "image_prompt" else references[i].multimodal_text, 32) for i in shown]
        save(name, rows, labels, ["reference"] + [_label(m) for m in methods])
    for method, passes in images.items():
        rows = [[references[i].image] + [im for key in ("image_prompt", "multimodal") if key in passes for im in passes[key][i]]
                for i in shown]
        columns = ["reference"] + [f"{'image' if key == 'image_prompt' else 'image+text'} {j + 1}"
                                   for key in ("image_prompt", "multimodal") if key in passes
                                   for j in range(len(passes[key][shown[0]]))]
        save(method, rows, [references[i].name for i in shown], columns)
        sweep = sorted((passes_key for passes_key in passes if passes_key.startswith("sweep ")), key=lambda k: float(k.split()[1]))
        if sweep:
            rows = [[references[i].image] + [passes[k][i][0] for k in sweep] for i in shown]
            save(f"sweep-{method}", rows, [_label(references[i].multimodal_text, 32) for i in shown],
                 ["reference"] + [f"scale {k.split()[1]}" for k in sweep])
    return written


def write_report(result, references: Sequence[Reference]) -> Path:
    """Write report.md, results.json, the contact sheets and the scale plot into ``result.folder``."""
    folder = Path(result.folder)
    write_sheets(folder / "sheets", result, references)
    plot = scale_plot(result.results["methods"])
    if plot is not None:
        write_png(plot, folder / "scale_sweep.png")
    write_text(folder / "results.json", json.dumps(_clean(result.results), indent=1, ensure_ascii=False))
    write_text(folder / "report.md", markdown(result.results))
    return folder / "report.md"
