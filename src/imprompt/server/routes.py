"""The HTTP routes: A1111's ``/sdapi/v1/*``, the ControlNet extension's ``/controlnet/*`` and the native
``/v1/*``. Each route turns its payload into a GenerateRequest plus decoded images and hands both to the
engine; errors come back in the CLI's words (422 bad input, 404 unknown model, 413 too large)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import secrets
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..errors import one_line
from ..generation.embeds import SUFFIXES as EMBEDS_SUFFIXES
from ..generation.pnginfo import decode_user_comment, parse_parameters
from ..generation.request import GenerateRequest
from ..generation.schedulers import SCHEDULERS
from ..images import ImageInputError
from ..models.catalog import ModelLookupError
from . import a1111
from .native import NativeRequest, TuneRequest, native_to_request, tune_to_config
from .config import ServerConfig
from .engine import Engine, Job
from .uploads import (UploadTooLarge, base64_bytes, decode_base64_image, decode_embeds_upload, decode_upload,
                      png_base64)

BASE64_OVERHEAD = 4 / 3
POLL_SECONDS = 0.05


def error_status(err: Exception) -> int:
    if isinstance(err, UploadTooLarge):
        return 413
    if isinstance(err, ModelLookupError):
        return 404
    return 422


def user_error(err: Exception) -> HTTPException:
    return HTTPException(error_status(err), detail=one_line(err))


class Images:
    """The images of one request, decoded with the server's limits and filed under reference names."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.by_name: dict[str, Any] = {}

    def add(self, image, name: str) -> str:
        """File a decoded image under a unique name (the one PNG info shows)."""
        base = name.replace("/", "_").replace("\\", "_") or "image"
        unique, n = base, 1
        while unique in self.by_name:
            n += 1
            unique = f"{base}-{n}"
        self.by_name[unique] = image
        return unique

    def add_base64(self, text: str, field: str, mode: str = "RGB") -> str:
        image = decode_base64_image(text, field=field, max_bytes=self.config.max_upload_bytes,
                                    max_pixels=self.config.max_pixels, mode=mode)
        return self.add(image, reference_name(field))

    def add_bytes(self, data: bytes, field: str, filename: str | None, mode: str = "RGB") -> str:
        if (filename or "").lower().endswith(EMBEDS_SUFFIXES):
            return self.add_embeds_bytes(data, field, filename)
        image = decode_upload(data, field=field, max_bytes=self.config.max_upload_bytes,
                              max_pixels=self.config.max_pixels, mode=mode)
        return self.add(image, (filename or field).rsplit("/", 1)[-1])

    def add_embeds_base64(self, text: str, field: str) -> str:
        data = base64_bytes(text, field=field, max_bytes=self.config.max_upload_bytes)
        features = decode_embeds_upload(data, field=field, max_bytes=self.config.max_upload_bytes)
        return self.add(features, reference_name(field).removesuffix(".png") + ".safetensors")

    def add_embeds_bytes(self, data: bytes, field: str, filename: str | None) -> str:
        name = (filename or field).rsplit("/", 1)[-1]
        return self.add(decode_embeds_upload(data, field=name, max_bytes=self.config.max_upload_bytes), name)


def reference_name(field: str) -> str:
    """A short name for an image sent as base64 (PNG info shows it): ``unit0.png`` for the first
    ControlNet-extension unit's image, ``image_prompts-0-images-1.png`` for a native one."""
    if match := re.search(r"args\[(\d+)\]\.(image|mask)$", field):
        return f"unit{match.group(1)}{'-mask' if match.group(2) == 'mask' else ''}.png"
    return re.sub(r"[^A-Za-z0-9]+", "-", field).strip("-") + ".png"


class Lookup:
    """Models by name among those found: never a path the client chose."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def __call__(self, name: str, kind: str) -> str:
        if not isinstance(name, str) or not name.strip() or name.strip().lower() == "none":
            raise ValueError(f"no {kind.replace('_', ' ')} given; GET /v1/models lists the names")
        return str(self.engine.catalog.find(name, kind).path)

    def encoder_family(self, adapter_path: str) -> str | None:
        for entry in self.engine.catalog.of_kind("adapter"):
            if str(entry.path) == adapter_path:
                family = entry.info.details.get("encoder")
                width = entry.info.details.get("encoder_width")
                # the family is a fact only for the published widths (a toy adapter has none)
                return family if width in (768, 1024, 1280, 1664) else None
        return None


async def wait_for(job: Job, request: Request) -> None:
    """Wait for ``job``; a client that goes away cancels it, so the queue moves on."""
    while not job.done:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(POLL_SECONDS)


def submit(engine: Engine, request: GenerateRequest, images: Images, source: str) -> Job:
    try:
        return engine.submit(request, images.by_name, source=source)
    except (ValueError, FileNotFoundError) as err:
        raise user_error(err) from None


def finished(job: Job) -> None:
    if job.state == "failed":
        raise HTTPException(500 if (job.error or "").startswith("internal error") else 422, detail=job.error)
    if job.state == "cancelled":
        raise HTTPException(409, detail="the job was cancelled (POST /sdapi/v1/interrupt or a client that left)")


def parameters_of(data: bytes) -> str | None:
    """The A1111 parameters of an image file's bytes: PNG text chunk, or JPEG / WebP EXIF UserComment."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if text := image.info.get("parameters"):
            return str(text)
        comment = image.getexif().get_ifd(0x8769).get(0x9286)
        return decode_user_comment(comment) if comment else None


async def _refuse(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide a client's disconnect from the
    routes): HTTP basic auth on every route when configured (A1111's ``--api-auth``, compared in constant
    time), and a body over the limit refused from its Content-Length before it is read (base64 makes
    images 4/3 larger and a request may carry several: the body limit is 4 uploads' worth)."""

    def __init__(self, app, max_bytes: int, credentials: tuple[str, str] | None = None):
        self.app, self.max_bytes = app, max_bytes
        self.expected = None if credentials is None else (
            "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.expected is not None and not secrets.compare_digest(headers.get("authorization", ""), self.expected):
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            return await _refuse(send, 401, "authentication required (--api-auth)",
                                 {"WWW-Authenticate": 'Basic realm="imprompt"'})
        length = headers.get("content-length", "")
        if scope["type"] == "http" and length.isdigit() and int(length) > self.max_bytes:
            return await _refuse(send, 413, f"request body of {int(length) / 2**20:.1f} MB is over the "
                                            f"{self.max_bytes / 2**20:.1f} MB limit")
        return await self.app(scope, receive, send)


class PngInfoPayload(BaseModel):
    image: str = Field(description="base64 image or data URL")


class OptionsPayload(BaseModel):
    model_config = ConfigDict(extra="allow")
    sd_model_checkpoint: str | None = None


# --- the routes --------------------------------------------------------------------------------------

def install(app: FastAPI, engine: Engine, config: ServerConfig) -> None:
    from .app import default_model

    lookup = Lookup(engine)
    state = {"model": None}  # the A1111 "current checkpoint" (POST /sdapi/v1/options), a server setting

    app.add_middleware(Guard, max_bytes=int(4 * config.max_upload_bytes * BASE64_OVERHEAD) + 65536,
                       credentials=config.credentials())

    def current_model() -> str:
        return state["model"] or default_model(engine)

    def checkpoint_title(path: str) -> str:
        for entry in engine.catalog.of_kind("checkpoint"):
            if str(entry.path) == path:
                return entry.name
        return path.rsplit("/", 1)[-1]

    async def run_a1111(payload: a1111.Txt2ImgPayload, request: Request) -> dict:
        images = Images(config)
        try:
            override = payload.override_settings.get("sd_model_checkpoint")
            model = lookup(a1111.strip_hash(override), "checkpoint") if override else current_model()
            generate = a1111.to_request(payload, model, lookup, images.add_base64, lookup.encoder_family)
        except (ValueError, FileNotFoundError) as err:
            raise user_error(err) from None
        job = await asyncio.to_thread(submit, engine, generate, images, "a1111")
        await wait_for(job, request)
        finished(job)
        seeds = [r.seed for r in job.images]
        infotexts = [r.parameters for r in job.images]
        first = job.images[0].image if job.images else None
        sampler = parse_parameters(infotexts[0]).get("Sampler", "") if infotexts else ""
        info = a1111.info_json(payload, seeds, infotexts, first.width if first else 0, first.height if first else 0, sampler)
        pngs = [png_base64(r.image, r.parameters) for r in job.images]
        if job.request.save_control_map:  # the extension appends the units' detected maps after the images
            pngs += [png_base64(job.inputs.controls[n], "") for n in job.inputs.preprocessed]
        return {"images": pngs if payload.send_images else [],
                "parameters": payload.model_dump(exclude={"init_images", "mask", "alwayson_scripts"}),
                "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img", tags=["A1111"])
    async def txt2img(payload: a1111.Txt2ImgPayload, request: Request) -> dict:
        return await run_a1111(payload, request)

    @app.post("/sdapi/v1/img2img", tags=["A1111"])
    async def img2img(payload: a1111.Img2ImgPayload, request: Request) -> dict:
        return await run_a1111(payload, request)

    @app.get("/sdapi/v1/sd-models", tags=["A1111"])
    def sd_models() -> list[dict]:
        return [{"title": e.name, "model_name": e.stem, "hash": None, "sha256": None, "filename": str(e.path),
                 "config": None} for e in engine.catalog.of_kind("checkpoint") if e.usable]

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["A1111"])
    def refresh_checkpoints() -> dict:
        engine.refresh()
        return {}

    @app.get("/sdapi/v1/loras", tags=["A1111"])
    def loras() -> list[dict]:
        """As A1111's Lora extension lists them; ``name`` is what ``<lora:NAME:W>`` takes."""
        return [{"name": e.stem, "alias": e.name, "path": str(e.path),
                 "metadata": {k: v for k, v in e.info.details.items() if v is not None}}
                for e in engine.catalog.of_kind("lora") if e.usable]

    @app.post("/sdapi/v1/refresh-loras", tags=["A1111"])
    def refresh_loras() -> dict:
        engine.refresh()
        return {}

    @app.get("/sdapi/v1/embeddings", tags=["A1111"])
    def embeddings() -> dict:
        """A1111's shape: ``loaded`` name -> {vectors, shape (width), ...}; the name is the prompt word."""
        loaded = {e.stem: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                           "shape": e.info.details.get("width"),
                           "vectors": e.info.details.get("vectors")}
                  for e in engine.catalog.of_kind("embedding") if e.usable}
        skipped = {e.stem: {"problem": e.info.problem} for e in engine.catalog.of_kind("embedding") if not e.usable}
        return {"loaded": loaded, "skipped": skipped}

    @app.get("/sdapi/v1/samplers", tags=["A1111"])
    def samplers() -> list[dict]:
        return [{"name": c.a1111, "aliases": [key], "options": {}} for key, c in SCHEDULERS.items()]

    @app.get("/sdapi/v1/options", tags=["A1111"])
    def get_options() -> dict:
        return {"sd_model_checkpoint": checkpoint_title(current_model()), "samples_format": "png",
                "CLIP_stop_at_last_layers": 1}

    @app.post("/sdapi/v1/options", tags=["A1111"])
    def set_options(payload: OptionsPayload) -> dict:
        if payload.sd_model_checkpoint:
            try:
                state["model"] = lookup(a1111.strip_hash(payload.sd_model_checkpoint), "checkpoint")
            except (ValueError, FileNotFoundError) as err:
                raise user_error(err) from None
        return {}

    @app.post("/sdapi/v1/png-info", tags=["A1111"])
    def png_info(payload: PngInfoPayload) -> dict:
        from .uploads import base64_bytes

        try:
            data = base64_bytes(payload.image, field="image", max_bytes=config.max_upload_bytes)
            text = parameters_of(data)
        except (ValueError, OSError) as err:
            raise user_error(err if isinstance(err, ValueError) else ImageInputError(f"image: {err}")) from None
        return {"info": text or "", "items": {"parameters": text} if text else {},
                "parameters": parse_parameters(text) if text else {}}

    @app.get("/sdapi/v1/progress", tags=["A1111"])
    def progress() -> dict:
        job = engine.current
        return {"progress": job.progress if job else 0.0, "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": bool(job and job.cancel_requested), "job": job.id if job else "",
                          "job_count": engine.pending() + (1 if job else 0), "sampling_step": job.step if job else 0,
                          "sampling_steps": job.total_steps if job else 0},
                "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt", tags=["A1111"])
    def interrupt() -> dict:
        if engine.current is not None:
            engine.current.cancel()
        return {}

    @app.get("/controlnet/version", tags=["ControlNet extension"])
    def controlnet_version() -> dict:
        return {"version": 2}

    @app.get("/controlnet/model_list", tags=["ControlNet extension"])
    def controlnet_models() -> dict:
        names = [e.name for kind in ("adapter", "controlnet") for e in engine.catalog.of_kind(kind) if e.usable]
        return {"model_list": names}

    @app.get("/controlnet/module_list", tags=["ControlNet extension"])
    def controlnet_modules() -> dict:
        return {"module_list": [*a1111.CONTROLNET_MODULES, *a1111.REFERENCE_MODES,
                                *[m for m in a1111.IP_ADAPTER_MODULES if "(" not in m]]}

    # --- native ---------------------------------------------------------------------------------------

    @app.get("/v1/models", tags=["native"])
    def models() -> dict:
        return {"models": [{"kind": e.kind, "name": e.name, "base": e.info.base, "details": e.info.details,
                            "usable": e.usable, "problem": e.info.problem} for e in engine.catalog.entries]}

    def uploads(images: Images, uploaded: dict[str, str] | None):
        """``image`` and ``embeds`` for the payload converters: a multipart file's name, else base64."""
        def named(ref: str, field: str) -> str | None:
            if uploaded is not None:
                if ref in uploaded:
                    return uploaded[ref]
                if len(ref) < 256:  # a file name, not base64: say which files did arrive
                    raise ValueError(f"{field}: {ref!r} is not among the uploaded files "
                                     f"({', '.join(sorted(uploaded)) or 'none'})")
            return None

        def image(ref: str, field: str, mode: str) -> str:
            return named(ref, field) or images.add_base64(ref, field, mode)

        def embeds(ref: str, field: str) -> str:
            return named(ref, field) or images.add_embeds_base64(ref, field)

        return image, embeds

    def native_job(body: NativeRequest, images: Images, uploaded: dict[str, str] | None = None) -> Job:
        try:
            model = lookup(body.model, "checkpoint") if body.model else current_model()
            generate = native_to_request(body, model, lookup, *uploads(images, uploaded))
        except (ValueError, FileNotFoundError) as err:
            raise user_error(err) from None
        return submit(engine, generate, images, "api")

    def tune_job(body: TuneRequest, images: Images) -> Job:
        try:
            model = lookup(body.model, "checkpoint") if body.model else current_model()
            config = tune_to_config(body, model, lookup, uploads(images, None)[0])
            return engine.submit_tune(config, images.by_name, source="api")
        except (ValueError, FileNotFoundError) as err:
            raise user_error(err) from None

    def result(job: Job) -> dict:
        if job.tuning is not None:  # the embeds file, for image_prompts[].embeds or `generate --embeds`
            return {**job.status(), "losses": job.losses,
                    "embeds": base64.b64encode(job.embeds).decode("ascii") if job.embeds else None}
        out = {**job.status(), "images": [{"seed": r.seed, "parameters": r.parameters,
                                           "png": png_base64(r.image, r.parameters)} for r in job.images]}
        if job.request.save_control_map:  # the preprocessed maps, by ControlNet
            out["control_maps"] = [{"controlnet": n, "png": png_base64(job.inputs.controls[n])}
                                   for n in job.inputs.preprocessed]
        return out

    @app.post("/v1/generate", tags=["native"])
    async def generate(body: NativeRequest, request: Request) -> dict:
        """Generate and wait: the images (base64 PNG with PNG info) and their seeds."""
        job = await asyncio.to_thread(native_job, body, Images(config))
        await wait_for(job, request)
        finished(job)
        return result(job)

    @app.post("/v1/tune", tags=["native"])
    async def tune(body: TuneRequest, request: Request) -> dict:
        """Tune an image prompt on its references (``imprompt tune``) and wait: the embeds file as base64
        (.safetensors), to send back as ``image_prompts[].embeds``, and the loss of every step."""
        job = await asyncio.to_thread(tune_job, body, Images(config))
        await wait_for(job, request)
        finished(job)
        return result(job)

    @app.post("/v1/tune/jobs", status_code=202, tags=["native"])
    async def create_tune_job(body: TuneRequest) -> dict:
        """Queue a tuning job; GET /v1/jobs/{id} (progress: its steps), /events and /result as for generations."""
        job = await asyncio.to_thread(tune_job, body, Images(config))
        return job.status()

    @app.post("/v1/jobs", status_code=202, tags=["native"])
    async def create_job(body: NativeRequest) -> dict:
        """Queue a generation; poll GET /v1/jobs/{id}, stream GET /v1/jobs/{id}/events."""
        job = await asyncio.to_thread(native_job, body, Images(config))
        return job.status()

    @app.post("/v1/jobs/upload", status_code=202, tags=["native"])
    async def create_job_multipart(request_json: str = Form(..., alias="request"),
                                   files: list[UploadFile] = File(default_factory=list)) -> dict:
        """Multipart: a ``request`` field (the JSON of POST /v1/jobs) whose image fields name uploaded files."""
        try:
            body = NativeRequest.model_validate_json(request_json)
        except ValueError as err:
            raise HTTPException(422, detail=f"request: {one_line(err)}") from None
        images = Images(config)
        uploaded = {}
        for upload in files:
            data = await upload.read(config.max_upload_bytes + 1)
            try:
                uploaded[upload.filename or "upload"] = images.add_bytes(data, "files", upload.filename)
            except ValueError as err:
                raise user_error(err) from None
        job = await asyncio.to_thread(native_job, body, images, uploaded)
        return job.status()

    def get_job(job_id: str) -> Job:
        job = engine.job(job_id)
        if job is None:
            raise HTTPException(404, detail=f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    @app.get("/v1/jobs/{job_id}", tags=["native"])
    def job_status(job_id: str) -> dict:
        return get_job(job_id).status()

    @app.get("/v1/jobs/{job_id}/result", tags=["native"])
    def job_result(job_id: str) -> dict:
        job = get_job(job_id)
        if not job.done:
            raise HTTPException(409, detail=f"job {job_id} is {job.state}; wait for it (GET /v1/jobs/{job_id}/events)")
        return result(job)

    @app.post("/v1/jobs/{job_id}/cancel", tags=["native"])
    def cancel_job(job_id: str) -> dict:
        job = get_job(job_id)
        job.cancel()
        return job.status()

    @app.get("/v1/jobs/{job_id}/events", tags=["native"])
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: the job's status at every change, the last one when it is finished."""
        job = get_job(job_id)

        async def stream():
            last = None
            while True:
                status = job.status()
                if status != last:
                    yield f"event: status\ndata: {json.dumps(status)}\n\n"
                    last = status
                if job.done or await request.is_disconnected():
                    return
                await asyncio.sleep(POLL_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.exception_handler(binascii.Error)
    async def _bad_base64(request: Request, err: binascii.Error) -> JSONResponse:
        return JSONResponse({"detail": f"invalid base64: {err}"}, status_code=422)
