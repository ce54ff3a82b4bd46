"""The server's settings, as ``imprompt serve`` flags and a YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import option

DEFAULT_PORT = 7860  # A1111's, so that its clients find us where they look


@dataclass
class ServerConfig:
    models_dir: list[str] = field(default_factory=list, metadata=option(
        "an AUTOMATIC1111 / Forge / ComfyUI root or a folder of models, listed in the pickers and looked up by "
        "name; repeat for several (default: $IMPROMPT_MODELS_DIR; none: the bundled toy model only)", metavar="DIR"))
    host: str = field(default="127.0.0.1", metadata=option("address to bind (see --listen)"))
    port: int = field(default=DEFAULT_PORT, metadata=option("port (A1111's 7860 by default)"))
    listen: bool = field(default=False, metadata=option("bind 0.0.0.0, reachable from other machines (as A1111's --listen)"))
    api_auth: str | None = field(default=None, metadata=option(
        "require HTTP basic auth, USER:PASSWORD (as A1111's --api-auth)", metavar="USER:PASSWORD"))
    save_dir: str | None = field(default=None, metadata=option(
        "also write every generated PNG here (atomically); by default the server writes nothing", metavar="DIR"))
    max_upload_mb: float = field(default=20.0, metadata=option("largest accepted upload or request body, in MB"))
    max_upload_megapixels: float = field(default=16.0, metadata=option("largest accepted image, in megapixels"))
    cache_gb: float = field(default=8.0, metadata=option("memory budget of the loaded-model cache, in GB"))
    embedding_cache: int = field(default=256, metadata=option("reference-image embeddings kept (0: none)"))
    device: str = field(default="auto", metadata=option("torch device: auto, cpu, cuda, cuda:N, mps"))
    dtype: str = field(default="auto", metadata=option("weights dtype: auto, float32, float16, bfloat16"))
    ui: bool = field(default=True, metadata=option("serve the web UI at / (else the APIs only)"))

    @property
    def bind_host(self) -> str:
        return "0.0.0.0" if self.listen else self.host

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_pixels(self) -> int:
        return int(self.max_upload_megapixels * 1_000_000)

    def credentials(self) -> tuple[str, str] | None:
        if self.api_auth is None:
            return None
        user, sep, password = self.api_auth.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth must be USER:PASSWORD, got {self.api_auth!r}")
        return user, password

    def check(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1 to 65535, got {self.port}")
        for name in ("max_upload_mb", "max_upload_megapixels", "cache_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.embedding_cache < 0:
            raise ValueError(f"embedding-cache must be >= 0, got {self.embedding_cache}")
        self.credentials()
