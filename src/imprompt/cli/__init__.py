"""``imprompt`` command line: thin subcommands that build a typed request and call the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from ..config import add_arguments, from_namespace


def _generate(namespace: argparse.Namespace) -> int:
    from ..generation.request import GenerateRequest, run

    run(from_namespace(GenerateRequest, namespace))
    return 0


def _train(namespace: argparse.Namespace) -> int:
    from ..training.config import TrainConfig, load_config
    from ..training.trainer import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(namespace).items() if k in fields and v is not None}
    train(load_config(namespace.config, overrides))
    return 0


def _info(namespace: argparse.Namespace) -> int:
    from ..generation.pnginfo import TRUNCATED, escape_controls, json_safe, parse_parameters, read_parameters

    text = read_parameters(namespace.image)
    if text is None:
        print(f"imprompt info: {escape_controls(namespace.image)}: no generation parameters (no 'parameters' PNG "
              "text chunk or EXIF UserComment)", file=sys.stderr)
        return 1
    params = parse_parameters(text)
    if TRUNCATED in params:
        print(f"imprompt info: note: {params[TRUNCATED]}", file=sys.stderr)
    if namespace.json:
        print(json_safe(json.dumps(params, indent=2, ensure_ascii=False)))
    else:
        # The text comes from a file anyone can write: no terminal escape sequence is printed raw.
        for key, value in params.items():
            print(f"{escape_controls(key)}: {escape_controls(value)}")
    return 0


def _toy(namespace: argparse.Namespace) -> int:
    from ..toy.build import main

    return main(namespace.args)


def _eval(namespace: argparse.Namespace) -> int:
    from ..evaluation.cli import main

    return main(namespace.args)


def build_parser() -> argparse.ArgumentParser:
    from ..generation.request import GenerateRequest

    parser = argparse.ArgumentParser(prog="imprompt", description="Image prompts (IP-Adapter) for Stable Diffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate images from image + text prompts",
                         description="Generate images with IP-Adapter image prompts. Per-adapter options take "
                                     "VALUE (all adapters) or N=VALUE (adapter N, in --adapter order).")
    add_arguments(gen, GenerateRequest)
    gen.set_defaults(func=_generate)
    from ..training.config import TrainConfig

    trainer = sub.add_parser("train", help="train an IP-Adapter (paper recipe; cached features; resumable)",
                             description="Train an IP-Adapter. Fields come from CONFIG.yaml; flags override them.")
    trainer.add_argument("config", nargs="?", help="YAML file with TrainConfig fields")
    add_arguments(trainer, TrainConfig, all_optional=True)
    trainer.set_defaults(func=_train)
    info = sub.add_parser("info", help="show the generation parameters stored in a PNG, JPEG or WebP")
    info.add_argument("image", help="an image written by imprompt or AUTOMATIC1111 (PNG, JPEG or WebP)")
    info.add_argument("--json", action="store_true", help="print as JSON")
    info.set_defaults(func=_info)
    evaluate = sub.add_parser("eval", help="evaluate adapters and baselines: CLIP-I, CLIP-T, toy attributes (imprompt eval --help)",
                              add_help=False)
    evaluate.add_argument("args", nargs=argparse.REMAINDER, help="CONFIG.yaml and options")
    evaluate.set_defaults(func=_eval)
    toy = sub.add_parser("toy", help="build the toy world's models (imprompt toy build --help)", add_help=False)
    toy.add_argument("args", nargs=argparse.REMAINDER, help="toy subcommand and its options")
    toy.set_defaults(func=_toy)
    return parser


# Subcommands with parsers of their own get the rest of the command line untouched (argparse's
# REMAINDER would not pass a leading option such as --help through).
DELEGATED = {"eval": _eval, "toy": _toy}


def one_line(err: BaseException) -> str:
    """An exception's message on one line, safe to print on a terminal."""
    from ..generation.pnginfo import escape_controls

    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__
    return escape_controls(text)


def _guarded(command: str, run) -> int:
    """The one error handler of every subcommand."""
    try:
        return run()
    except (ValueError, FileNotFoundError) as err:
        # Errors a user can cause (CheckpointError, ImageInputError, UnsafeFileError, PickleRefusedError,
        # ConfigError are ValueErrors; ModelNotFoundError is a FileNotFoundError): one line, no traceback.
        # Anything else is a bug and keeps its traceback.
        print(f"imprompt {command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"imprompt {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=os.environ.get("IMPROMPT_LOG", "WARNING"))
    if argv and argv[0] in DELEGATED:
        return _guarded(argv[0], lambda: DELEGATED[argv[0]](argparse.Namespace(args=argv[1:])))
    namespace = build_parser().parse_args(argv)
    return _guarded(namespace.command, lambda: namespace.func(namespace))


if __name__ == "__main__":
    sys.exit(main())
