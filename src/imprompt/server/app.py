"""The FastAPI application: the AUTOMATIC1111-compatible API under ``/sdapi/v1`` and ``/controlnet``, the
native API under ``/v1``, and the Gradio UI at ``/``; all over one :class:`~imprompt.server.engine.Engine`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from .. import toy
from ..models.catalog import roots_from
from .config import ServerConfig
from .engine import Engine


def make_engine(config: ServerConfig) -> Engine:
    """The engine over the configured model folders, with the bundled toy world always among them."""
    extra = [toy.PACKAGE_DIR] if toy.toy_available() else []
    return Engine(config, roots_from(config.models_dir), extra)


def create_app(config: ServerConfig | None = None, engine: Engine | None = None) -> FastAPI:
    config = config or ServerConfig()
    config.check()
    engine = engine or make_engine(config)
    app = FastAPI(title="imprompt", version="0.1.0",
                  description="Image prompts for Stable Diffusion: an AUTOMATIC1111-compatible API and a native one.")
    app.state.engine, app.state.config = engine, config
    from . import routes

    routes.install(app, engine, config)
    if config.ui:
        import gradio as gr

        from .ui import build_ui

        app = gr.mount_gradio_app(app, build_ui(engine), path="/")
    return app


def default_model(engine: Engine) -> str:
    """The first checkpoint of the user's folders, else the bundled toy model."""
    checkpoints = engine.catalog.of_kind("checkpoint")
    own = [e for e in checkpoints if e.root != toy.PACKAGE_DIR]
    chosen = (own or checkpoints)
    return str(chosen[0].path) if chosen else str(toy.toy_paths()["model"])


__all__ = ["create_app", "make_engine", "default_model", "Path"]
