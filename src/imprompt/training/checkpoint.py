"""Training checkpoints: written atomically, found for --resume, checked against the run before it starts."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..adapter.checkpoint import save_adapter
from ..adapter.model import IPAdapter
from ..adapter.variants import AdapterVariant
from ..files import atomic_dir, atomic_write, load_torch_weights, write_text
from .config import TrainConfig


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if re.fullmatch(r"step-\d{8}", p.name) and (p / "state.json").is_file())


def find_resume(config: TrainConfig) -> Path | None:
    if not config.resume:
        return None
    if config.resume == "latest":
        found = checkpoints(Path(config.output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path / "state.json").is_file():
        raise ValueError(f"--resume {config.resume!r}: not a checkpoint folder (no state.json)")
    return path


def adapter_settings(config: TrainConfig, variant: AdapterVariant) -> dict:
    """What decides the adapter's shape (saved in each checkpoint, compared on resume)."""
    return {"variant": config.variant, **dataclasses.asdict(variant)}


# The config field to change for each setting that can differ.
_SETTING_FIELDS = {"variant": "variant", "projection": "variant", "num_tokens": "num_tokens",
                   "resampler_width": "resampler_width", "resampler_depth": "resampler_depth",
                   "image_embed_dim": "image_encoder", "cross_attention_dim": "model"}


def check_resume(checkpoint: Path, state: dict, config: TrainConfig, variant: AdapterVariant) -> None:
    """Refuse a checkpoint this run cannot continue, saying why and what to do, before anything is built."""
    step = int(state["step"])
    if step > config.max_steps:
        raise ValueError(f"checkpoint {checkpoint} is at step {step}, beyond max_steps {config.max_steps}; raise "
                         f"--max-steps above {step} to continue it, or use its adapter.safetensors as it is")
    saved = state.get("settings")
    if saved is None:
        return  # written before settings were saved: the state dict load says whether it fits
    differ = _differences(saved, adapter_settings(config, variant))
    if differ:
        then, now, fields = differ
        raise ValueError(f"checkpoint {checkpoint} was trained with {then}; this run has {now} (set by "
                         f"{fields}): resume with the checkpoint's settings, or train afresh in a new "
                         "--output-dir (or without --resume)")


def _differences(then: dict, now: dict) -> tuple[str, str, str] | None:
    """The settings in which ``then`` and ``now`` differ, as 'k=v, ...' on each side and the config fields that
    set them; None where they agree (settings only one side has are not compared)."""
    differ = [k for k in now if k in then and then[k] != now[k]]
    if not differ:
        return None
    return (", ".join(f"{k}={then[k]}" for k in differ), ", ".join(f"{k}={now[k]}" for k in differ),
            ", ".join(sorted({_SETTING_FIELDS.get(k, k) for k in differ})))


def initial_adapter(config: TrainConfig, variant: AdapterVariant) -> IPAdapter | None:
    """The adapter of ``--init-adapter`` (None without one), refused unless it is of ``variant``: the official
    ``tutorial_train.py`` starts from such a file with ``--pretrained_ip_adapter_path``. Read before any
    caching, so that a wrong file costs seconds."""
    if config.init_adapter is None:
        return None
    from ..adapter.checkpoint import load_adapter

    loaded = load_adapter(config.init_adapter)
    if loaded.variant != variant:
        then, now, fields = _differences(dataclasses.asdict(loaded.variant), dataclasses.asdict(variant))
        raise ValueError(f"--init-adapter {config.init_adapter} is a {loaded.variant.display_name} adapter with "
                         f"{then}; this run builds {now} (set by {fields}): give the adapter made for this model "
                         "and image encoder, or matching settings")
    return loaded


def save_checkpoint(folder: Path, step: int, adapter: IPAdapter, optimizer, scheduler, keep: int, state: dict) -> Path:
    """Write ``step-N/`` (adapter, optimizer, LR scheduler, ``state``) atomically: a kill at any moment
    leaves the previous checkpoints and at most a ``.step-N.*.tmp`` folder, never half a checkpoint."""
    final = folder / f"step-{step:08d}"
    with atomic_dir(final) as staging:
        save_adapter(adapter, staging / "adapter.safetensors")
        with atomic_write(staging / "optimizer.pt") as f:
            torch.save(optimizer.state_dict(), f)
        with atomic_write(staging / "lr_scheduler.pt") as f:
            torch.save(scheduler.state_dict(), f)
        write_text(staging / "state.json", json.dumps({"step": step, **state}))
    for old in checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(checkpoint: Path, adapter: IPAdapter, optimizer, scheduler) -> None:
    """The adapter, optimizer and LR scheduler state of ``checkpoint`` (weights-only loads)."""
    try:
        adapter.load_state_dict(load_file(checkpoint / "adapter.safetensors"))
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(f"checkpoint {checkpoint} does not fit this run's adapter ({' '.join(first[1:3]).strip()[:300]}); "
                         "resume with the settings it was trained with, or train afresh in a new --output-dir") from None
    optimizer.load_state_dict(load_torch_weights(checkpoint / "optimizer.pt", "optimizer state"))
    scheduler.load_state_dict(load_torch_weights(checkpoint / "lr_scheduler.pt", "LR scheduler state"))
