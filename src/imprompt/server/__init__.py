"""``imprompt serve``: one process with a web UI (Gradio), an AUTOMATIC1111-compatible HTTP API and a native
API, over one generation engine (:mod:`.engine`) that keeps models loaded and runs one job at a time.

Modules: :mod:`.config` (ServerConfig), :mod:`.engine` (model cache, embedding cache, job queue),
:mod:`.uploads` (images from requests, with limits), :mod:`.a1111` (A1111 and ControlNet-extension
payloads to requests), :mod:`.app` (the FastAPI routes), :mod:`.ui` (the Gradio page) and
:mod:`.ui_session` (what the page asks of the engine).
"""
