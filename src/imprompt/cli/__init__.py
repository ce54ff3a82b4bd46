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
    from ..generation.pnginfo import parse_parameters, read_png_parameters

    text = read_png_parameters(namespace.image)
    if text is None:
        print(f"{namespace.image}: no generation parameters (no 'parameters' PNG text chunk)", file=sys.stderr)
        return 1
    if namespace.json:
        print(json.dumps(parse_parameters(text), indent=2, ensure_ascii=False))
    else:
        for key, value in parse_parameters(text).items():
            print(f"{key}: {value}")
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
    info = sub.add_parser("info", help="show the generation parameters stored in a PNG")
    info.add_argument("image", help="a PNG written by imprompt or AUTOMATIC1111")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argparse.Namespace(args=argv[1:]))
    parser = build_parser()
    namespace = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("IMPROMPT_LOG", "WARNING"))
    from ..adapter.variants import CheckpointError
    from ..encoding import ImageInputError
    from ..generation.pipelines import ModelNotFoundError

    try:
        return namespace.func(namespace)
    except (CheckpointError, ImageInputError, ModelNotFoundError, ValueError) as err:
        # Expected user errors: one clear line, no traceback.
        print(f"imprompt {namespace.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
