"""The generation engine behind every route: models kept loaded, reference embeddings cached, one job at
a time.

- the caches of :mod:`imprompt.generation.cache`: loaded models (LRU within a memory budget) and CLIP
  features by pixel content, so a repeated model or reference costs nothing the second time.
- :class:`Engine`: requests are checked and their images decoded in the caller's thread (so a bad one
  is answered at once, with the CLI's message), then queued; one worker thread runs them in order.
  Attaching adapters changes the UNet's attention processors, so two generations on one UNet at once
  would see each other's adapters: the single worker rules that out. Each job carries its own
  progress, cancel flag and results; nothing about a job lives on a shared module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from PIL import Image

from ..generation.cache import CachedLoader, EmbeddingCache, ModelCache
from ..generation.embeds import ImageFeatures, embeds_file_bytes
from ..generation.outputs import next_index, save_control_maps, save_numbered_png
from ..generation.loading import load_models
from ..generation.request import (AdapterOptions, GenerateRequest, Inputs, Rendered, pick_seed, prepare, read_inputs,
                                  render)
from ..models.catalog import Catalog
from ..training.tune import TuneConfig, TuneOptions, prepare_tune, tune_loaded
from .config import ServerConfig

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
MAX_FINISHED_JOBS = 256  # kept for GET /v1/jobs/{id}; older ones are forgotten


class JobCancelled(Exception):
    """Raised in the step callback of a job whose cancel was asked for."""


@dataclass(eq=False)
class Job:
    """One queued generation: what to do, and (written by the worker only) how it goes."""

    id: str
    request: GenerateRequest
    options: list[AdapterOptions]
    inputs: Inputs
    seed: int
    catalog: Catalog | None
    source: str = "api"  # "ui", "api" (native), "a1111": for the record only
    state: str = "queued"
    step: int = 0
    total_steps: int = 0
    images: list[Rendered] = field(default_factory=list)
    tuning: TuneOptions | None = None  # a tuning job (POST /v1/tune): features come back, not images
    embeds: bytes | None = None  # a tuning job's result: the .safetensors embeds file
    losses: list[float] = field(default_factory=list)  # a tuning job's loss at each step so far
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the job to stop: a queued job never starts, a running one stops at its next step."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return self.step / self.total_steps if self.total_steps else 0.0

    def status(self) -> dict:
        return {"id": self.id, "kind": "tune" if self.tuning else "generate", "state": self.state,
                "step": self.step, "total_steps": self.total_steps, "progress": round(self.progress, 4),
                "images": len(self.images), "error": self.error,
                "seed": self.seed, "created": self.created, "started": self.started, "finished": self.finished}


def denoising_steps(request: GenerateRequest) -> int:
    """Steps the pipeline runs per batch: img2img and inpainting run steps x strength of them."""
    return int(request.steps * request.strength) if request.init_image is not None else request.steps


class Engine:
    """Queue and worker over the caches; see the module doc."""

    def __init__(self, config: ServerConfig, roots: list[Path], extra_roots: list[Path] = ()):
        self.config = config
        self.roots, self.extra_roots = list(roots), list(extra_roots)
        self.models = ModelCache(int(config.cache_gb * 2**30))
        self.embeddings = EmbeddingCache(config.embedding_cache)
        self.loader = CachedLoader(self.models, self.embeddings)
        self.catalog = self._scan()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.current: Job | None = None
        self._worker = threading.Thread(target=self._work, name="imprompt-worker", daemon=True)
        self._worker.start()

    # --- models -------------------------------------------------------------------------------------

    def _scan(self) -> Catalog:
        return Catalog.scan([*self.roots, *self.extra_roots])

    def refresh(self) -> Catalog:
        """Scan the model folders again (the UI's refresh button, A1111's refresh-checkpoints)."""
        self.catalog = self._scan()
        return self.catalog

    # --- jobs ---------------------------------------------------------------------------------------

    def submit(self, request: GenerateRequest, images: Mapping[str, Any] | None = None, *,
               source: str = "api") -> Job:
        """Check ``request`` and read its inputs (``images``: reference name -> decoded image; names not
        there are refused), then queue it. Raises the CLI's errors (ValueError / FileNotFoundError)."""
        request = dataclasses.replace(request, device=self.config.device if request.device == "auto" else request.device,
                                      dtype=self.config.dtype if request.dtype == "auto" else request.dtype,
                                      output=self.config.save_dir or ".")
        request, options, catalog = prepare(request, log=lambda message: None, catalog=self.catalog)
        inputs = read_inputs(request, options, *_readers(images))
        return self._queue_job(Job(
            id=self._new_id(), request=request, options=options, inputs=inputs, seed=pick_seed(request),
            catalog=self.catalog if catalog is None else catalog, source=source,
            total_steps=denoising_steps(request) * math.ceil(request.num_images / request.batch_size)))

    def submit_tune(self, config: TuneConfig, images: Mapping[str, Any] | None = None, *,
                    source: str = "api") -> Job:
        """Queue a tuning job (:mod:`imprompt.training.tune`): ``config.image`` names uploaded images, its
        output is ignored (the job keeps the embeds file's bytes). It runs on the worker, like a generation:
        tuning attaches the adapter to the shared UNet for its steps. Its models are float32 whatever the
        server's dtype (the cache keeps them beside the server's own)."""
        config.options.check()
        if not config.image:
            raise ValueError("tuning needs at least one reference image")
        if config.device == "auto":
            config = dataclasses.replace(config, device=self.config.device)
        request, options, catalog = prepare_tune(config, log=lambda message: None, catalog=self.catalog)
        inputs = read_inputs(request, options, *_readers(images))
        return self._queue_job(Job(
            id=self._new_id(), request=request, options=options, inputs=inputs, seed=config.seed,
            catalog=self.catalog if catalog is None else catalog, source=source, tuning=config.options,
            total_steps=config.steps))

    def _new_id(self) -> str:
        return f"job-{next(self._ids)}-{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:8]}"

    def _queue_job(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
            finished = [k for k, j in self._jobs.items() if j.done]
            for key in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
                del self._jobs[key]
        self._queue.put(job)
        return job

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def pending(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, and stop the worker."""
        for job in self.jobs():
            job.cancel()
        self._queue.put(None)
        self._worker.join(timeout)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel_requested:
                self._finish(job, "cancelled")
                continue
            self.current = job
            job.state, job.started = "running", time.time()
            try:
                self._run(job)
                self._finish(job, "done")
            except JobCancelled:
                self._finish(job, "cancelled")
            except (ValueError, FileNotFoundError, OSError) as err:  # the user's error, in the CLI's words
                from ..errors import one_line

                self._finish(job, "failed", one_line(err))
            except Exception as err:  # noqa: BLE001 - a bug: keep serving, say what broke in one line
                self._finish(job, "failed", f"internal error ({type(err).__name__}: {err}); please report it")
            finally:
                self.current = None

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        job._done.set()

    def _run(self, job: Job) -> None:
        if job.tuning is not None:
            self._run_tune(job)
            return
        request = job.request
        per_batch = denoising_steps(request)
        models = load_models(request, job.options, job.catalog, self.loader)
        batches_done = 0

        def on_step(pipeline, step: int, timestep, tensors: dict) -> dict:
            if job.cancel_requested:
                raise JobCancelled
            job.step = batches_done * per_batch + step + 1
            return tensors

        save_dir = Path(self.config.save_dir) if self.config.save_dir else None
        index = next_index(save_dir) if save_dir and save_dir.is_dir() else 0
        if save_dir is not None and request.save_control_map:  # the detected maps, as the CLI writes them
            save_dir.mkdir(parents=True, exist_ok=True)
            save_control_maps(save_dir, index, job.inputs, log=lambda message: None)
        for batch in render(request, job.options, models, job.inputs, job.seed, callback=on_step):
            if save_dir is not None:  # written as the CLI writes: atomically, never over another image
                save_dir.mkdir(parents=True, exist_ok=True)
                for item in batch:
                    _, index = save_numbered_png(save_dir, index, item.seed, item.image, item.parameters)
                    index += 1
            job.images.extend(batch)
            batches_done += 1
            job.step = batches_done * per_batch

    def _run_tune(self, job: Job) -> None:
        models = load_models(job.request, job.options, job.catalog, self.loader)

        def on_step(step: int, loss: float) -> None:
            if job.cancel_requested:
                raise JobCancelled
            job.losses.append(loss)
            job.step = step

        result = tune_loaded(models, job.inputs.prompts[0].images, job.request.prompt, job.tuning,
                             crop=job.request.crop, progress=on_step)
        job.embeds = embeds_file_bytes(result.features)
        job.step = job.total_steps


def _readers(uploads: Mapping[str, Any] | None) -> tuple[Callable, Callable]:
    """``read`` and ``read_embeds`` for :func:`read_inputs` over a request's uploads (name -> decoded
    image or :class:`ImageFeatures`); a name that did not arrive is refused."""
    uploads = dict(uploads or {})

    def get(name: str, kind: type, what: str):
        if not isinstance(uploads.get(name), kind):
            raise ValueError(f"{what} {name!r} was not uploaded with the request")
        return uploads[name]

    def read(name: str, mode: str = "RGB"):
        return get(name, Image.Image, "image").convert(mode)

    return read, lambda name: get(name, ImageFeatures, "embeds")
