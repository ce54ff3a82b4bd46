"""What the web UI's page needs from the engine (:class:`Session`): catalog names for its pickers, uploads
read under the server's limits, and the jobs behind its Generate and Tune buttons, watched until done.
The page's layout is :mod:`imprompt.server.ui`; the form -> request mapping is :mod:`imprompt.server.form`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a closed machine

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

from ..errors import one_line  # noqa: E402
from ..generation.embeds import embeds_from_bytes  # noqa: E402
from ..generation.pnginfo import save_png  # noqa: E402
from .engine import Engine  # noqa: E402
from .form import Form, UnitForm, form_request, unit_tune_config  # noqa: E402
from .uploads import decode_embeds_upload, decode_upload  # noqa: E402

POLL_SECONDS = 0.2


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

    def read_embeds(self, path: str):
        return decode_embeds_upload(Path(path).read_bytes(), field=Path(path).name,
                                    max_bytes=self.engine.config.max_upload_bytes)

    def _filer(self) -> tuple[dict, Callable[[Any, str], str]]:
        """A dict of decoded uploads for the engine, and the function that files one under a unique name."""
        images: dict[str, object] = {}

        def add(image, name: str) -> str:
            unique, n = name, 1
            while unique in images:
                n += 1
                unique = f"{Path(name).stem}-{n}{Path(name).suffix or '.png'}"
            images[unique] = image
            return unique

        return images, add

    def tune(self, model: str | None, unit: UnitForm, number: int, caption: str, steps: int, guard: int = 0):
        """A unit's "Tune" button (:mod:`imprompt.training.tune`, as ``imprompt tune``): queue the tuning of
        its references, then yield (progress text, embeds path or None) every POLL_SECONDS. The last path is
        the ``.safetensors`` file the job made, in the session's folder, for the unit's "saved embeds"."""
        images, add = self._filer()
        try:
            config = unit_tune_config(model, unit, number, caption, steps, self.lookup, self.read, add, guard)
            if not config.model:
                from .app import default_model

                config.model = default_model(self.engine)
            job = self.engine.submit_tune(config, images, source="ui")
        except (ValueError, FileNotFoundError) as err:
            yield error_box(one_line(err)), None
            raise gr.Error(one_line(err)) from None
        while not job.done:
            yield f"tuning: step {job.step} of {job.total_steps} ({job.state})", None
            time.sleep(POLL_SECONDS)
        if job.state != "done":
            message = job.error or f"tuning {job.state} at step {job.step} of {job.total_steps}"
            yield error_box(message), None
            raise gr.Error(message)
        path = self.folder / f"tuned-{job.id}.safetensors"
        path.write_bytes(job.embeds)
        loss = f", loss {job.losses[0]:.4f} -> {job.losses[-1]:.4f}" if job.losses else ""
        kept = json.loads(embeds_from_bytes(job.embeds, path.name).tuning or "{}").get("guard", {}).get("kept")
        guard_note = f"; the guard kept the {kept} features" if kept else ""
        yield (f"tuned {job.total_steps} steps{loss}{guard_note}: the saved embeds below replace the references "
               "(clear them to use the references again)"), str(path)

    def run(self, form: Form):
        """Submit, then yield (progress text, gallery paths or None, parameters text, job) every
        POLL_SECONDS until the job is done. The job travels to the caller (each browser tab keeps its own
        in a gr.State), never on the session. A refused request or failed job: the message, one line, in
        the status box and as gr.Error."""
        images, add = self._filer()  # decoded images, and features of saved embeds
        try:
            request = form_request(form, self.lookup, self.read, add, self.read_embeds)
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


def error_box(message: str) -> str:
    return f"**Error:** {message}"
