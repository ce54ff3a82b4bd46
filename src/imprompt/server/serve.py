"""``imprompt serve``: build the app and run it with uvicorn until interrupted."""

from __future__ import annotations

import uvicorn  # first, so that a missing [serve] extra is named by the CLI

from .app import create_app
from .config import ServerConfig


def serve(config: ServerConfig, log=print) -> int:
    config.check()
    app = create_app(config)
    host = config.bind_host
    shown = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host
    log(f"imprompt serve: http://{shown}:{config.port}/ (web UI), /docs (API), /sdapi/v1 (AUTOMATIC1111 API)"
        + (" - listening on all interfaces" if config.listen else ""))
    try:
        uvicorn.run(app, host=host, port=config.port, log_level="warning")
    finally:
        app.state.engine.close()
    return 0
