"""No pickle is ever loaded in a way that can run code (issue 10, defect 13).

Two halves that together cover the whole package: every pickle read goes through
``imprompt.files.load_torch_weights`` (the source scan below), and every loader that reads
.bin / .pt / .pth / .ckpt files, that one included, refuses a malicious pickle without running it
and says so in one line, without passing on torch's advice to load it with ``weights_only=False``.
"""

from __future__ import annotations

import io
import os
import pickle
import tokenize
from pathlib import Path

import pytest
import torch

from imprompt.adapter.checkpoint import load_adapter, load_shared_adapter, read_state
from imprompt.files import load_torch_weights
from imprompt.generation.embeds import load_embeds
from imprompt.generation.loras import read_lora
from imprompt.models.embeddings import read_embedding

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "src", ROOT / "benchmarks"]
THE_LOADER = ROOT / "src" / "imprompt" / "files.py"


def _code_tokens(path: Path) -> list[str]:
    """The file's code as a list of token strings: comments and string literals (docstrings that
    mention ``weights_only=False`` to forbid it) are not code."""
    skip = {tokenize.COMMENT, tokenize.STRING, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    skip |= {getattr(tokenize, name) for name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, name)}
    with open(path, "rb") as f:
        return [t.string for t in tokenize.tokenize(f.readline) if t.type not in skip]


def _find(tokens: list[str], pattern: list[str]) -> int:
    return sum(tokens[i:i + len(pattern)] == pattern for i in range(len(tokens)))


# token sequence -> (what it is, whether files.py, the one loader, may contain it)
FORBIDDEN = {
    ("weights_only", "=", "False"): ("torch.load(weights_only=False): runs the pickle's code", False),
    ("torch", ".", "load", "("): ("torch.load outside imprompt.files.load_torch_weights", True),
    ("pickle", ".", "load", "("): ("pickle.load: runs the pickle's code", False),
    ("pickle", ".", "loads", "("): ("pickle.loads: runs the pickle's code", False),
    ("allow_pickle", "=", "True"): ("numpy.load(allow_pickle=True): runs the pickle's code", False),
}


def _python_files() -> list[Path]:
    files = sorted(p for folder in SCANNED if folder.is_dir() for p in folder.rglob("*.py"))
    assert THE_LOADER in files and len(files) > 20  # the scan really covers the package
    return files


def test_scanner_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('import torch\n# torch.load(x, weights_only=False) in a comment is fine\n"torch.load(" \n'
                      "state = torch.load(path, map_location='cpu', weights_only = False)\n")
    tokens = _code_tokens(sample)
    assert _find(tokens, ["torch", ".", "load", "("]) == 1
    assert _find(tokens, ["weights_only", "=", "False"]) == 1


def test_no_unsafe_pickle_loading_in_the_package():
    found = []
    for path in _python_files():
        tokens = _code_tokens(path)
        for pattern, (what, allowed_in_loader) in FORBIDDEN.items():
            if allowed_in_loader and path == THE_LOADER:
                continue
            if _find(tokens, list(pattern)):
                found.append(f"{path.relative_to(ROOT)}: {what}")
    assert not found, "pickles must be read through imprompt.files.load_torch_weights only:\n" + "\n".join(found)


# --------------------------------------------------------------------------------------------------
# A malicious file, fed to every loader
# --------------------------------------------------------------------------------------------------


class Payload:
    """Creates the marker file if unpickled, i.e. if the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _write_malicious(path: Path, marker: Path, form: str) -> None:
    payload = {"image_proj": {"proj.weight": Payload(marker)}, "ip_adapter": {}}
    if form == "zip":
        torch.save(payload, path)
    elif form == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle stream, as pickle.dump writes it
        path.write_bytes(pickle.dumps(payload, protocol=4))
    assert not marker.exists()


LOADERS = {
    "load_adapter": load_adapter,
    "read_state": read_state,
    "load_shared_adapter": load_shared_adapter,
    "files.load_torch_weights": load_torch_weights,
    "read_lora": read_lora,
    "read_embedding": read_embedding,
    "load_embeds": load_embeds,
}


@pytest.mark.parametrize("form", ["zip", "legacy", "bare-pickle"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_malicious_pickle_is_refused_without_running(tmp_path, loader, form):
    marker = tmp_path / "code-ran"
    for suffix in (".bin", ".pt", ".pth", ".ckpt"):
        path = tmp_path / f"evil{suffix}"
        _write_malicious(path, marker, form)
        with pytest.raises(ValueError) as err:
            LOADERS[loader](path)
        assert not marker.exists(), f"{loader} ran the pickle's code ({path.name})"
        message = str(err.value)
        assert message and "\n" not in message, f"not one line: {message!r}"
        assert path.name in message
        # Never pass on torch's advice to load the file with weights_only=False, in any wording.
        assert "weights_only=False" not in message
        assert "weights_only" not in message, f"passes on torch's weights_only advice: {message!r}"
        assert "\x1b" not in message  # no terminal escape codes from torch's message either


def test_malicious_pickle_in_a_safetensors_named_file_is_not_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.safetensors"
    _write_malicious(path, marker, "zip")
    with pytest.raises(ValueError, match=r"evil\.safetensors is a PyTorch pickle .*rename it to evil\.bin"):
        load_adapter(path)
    assert not marker.exists()


def test_marker_payload_really_runs_when_unpickled(tmp_path):
    """The payload is live: plain pickle.load would create the marker (so its absence above means
    the loaders refused it, not that the payload was inert)."""
    marker = tmp_path / "code-ran"
    data = pickle.dumps(Payload(marker))
    unpickler = pickle.Unpickler(io.BytesIO(data))
    unpickler.load().close()
    assert marker.exists()
    os.unlink(marker)
