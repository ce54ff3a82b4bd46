"""``imprompt toy build | derive | extras | quality | control``: the toy world's commands.

Each subcommand's flags are built from its typed config (:func:`imprompt.config.add_arguments`):
:class:`~imprompt.toy.config.BuildConfig` and :class:`~imprompt.toy.config.StageSelection`,
:class:`~imprompt.toy.derivative.DeriveConfig`, :class:`~imprompt.toy.quality.QualityConfig`,
:class:`~imprompt.toy.control_quality.ControlQualityConfig`. Errors a
user can cause (a bad value, a missing folder, a refused checkpoint) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from ..config import add_arguments, from_namespace
from ..errors import guarded
from .config import BuildConfig, StageSelection
from .control_quality import ControlQualityConfig
from .derivative import DeriveConfig
from .extras import ExtrasConfig
from .quality import QualityConfig


def _build(namespace: argparse.Namespace) -> None:
    from .build import run

    run(from_namespace(BuildConfig, namespace), from_namespace(StageSelection, namespace))


def _derive(namespace: argparse.Namespace) -> None:
    from .derivative import derive

    derive(from_namespace(DeriveConfig, namespace))


def _extras(namespace: argparse.Namespace) -> None:
    from .extras import run

    run(from_namespace(ExtrasConfig, namespace))


def _quality(namespace: argparse.Namespace) -> None:
    from .quality import run

    run(from_namespace(QualityConfig, namespace))


def _control(namespace: argparse.Namespace) -> None:
    from .control_quality import run

    run(from_namespace(ControlQualityConfig, namespace))


COMMANDS = (
    ("build", "regenerate the toy models from a seed in resumable stages (data, tokenizer, clip, robust_clip, vae, "
              "latents, unet, pipeline, adapter, simple_adapter, quality, controlnet, package); finished stages are "
              "skipped, independent ones run side by side",
     (BuildConfig, StageSelection), _build),
    ("derive", "fine-tune the toy UNet on one style: a derivative model, for the paper's reuse claim",
     (DeriveConfig,), _derive),
    ("extras", "the toy LoRA (extracted from the derivative) and textual-inversion embedding, built and measured "
               "(docs/toy-extras.md)", (ExtrasConfig,), _extras),
    ("quality", "measure the toy quality targets (text-to-image, image prompt alone, unconditional, image + text) "
                "of a toy pipeline and adapter on a test split folder", (QualityConfig,), _quality),
    ("control", "measure how well generations follow the toy ControlNet (alone, with the caption, with the "
                "adapter, with the adapter and a text naming the shape) on a test split folder",
     (ControlQualityConfig,), _control),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imprompt toy", description="The toy world: build its models, derive a "
                                     "fine-tuned model from them, measure their quality")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, description, configs, func in COMMANDS:
        command = sub.add_parser(name, help=description.split(";")[0].split(" (")[0], description=description)
        for config in configs:
            add_arguments(command, config)
        command.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    return guarded(f"toy {namespace.command}", lambda: namespace.func(namespace))


if __name__ == "__main__":
    sys.exit(main())
