"""``imprompt eval CONFIG.yaml [flags]``: fields come from the YAML file, flags override them.

The flags are built from :class:`~imprompt.evaluation.config.EvalConfig`; ``--method`` (also
``--methods``) takes ``NAME:KIND[:key=value,...]`` and may be repeated, replacing the file's list.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..config import add_arguments
from ..errors import guarded
from .config import EvalConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imprompt eval",
        description="Evaluate IP-Adapters and baselines (CLIP-I, CLIP-T; attribute accuracy in the toy world) on the "
                    "same references and seeds, and write a report folder. Fields come from CONFIG.yaml; flags override them.",
        epilog="example: imprompt eval --data toy:test --references 50 --method ip:ip_adapter "
               "--method text:text_only --method uncond:unconditional --method i2i:img2img:strength=0.6")
    parser.add_argument("config", nargs="?", help="YAML file with EvalConfig fields (methods: a list of mappings)")
    # --method values stay strings here; load_config parses them (the field's ``parse``), so a bad
    # one gets the same one-line error as a bad YAML entry.
    add_arguments(parser, EvalConfig, all_optional=True)
    return parser


def run(namespace: argparse.Namespace) -> None:
    from .run import evaluate

    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    overrides = {k: v for k, v in vars(namespace).items() if k in fields and v is not None}
    evaluate(load_config(namespace.config, overrides))


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    return guarded("eval", lambda: run(namespace))


if __name__ == "__main__":
    sys.exit(main())
