"""``imprompt`` command line: thin subcommands that build a typed request and call the library.

Each sub-command's flags are built only when it is the one asked for, so ``imprompt --help`` and the
commands that need no model (``imprompt info``) start without importing torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

from ..config import add_arguments, from_namespace
from ..errors import guarded


def _generate(namespace: argparse.Namespace) -> int:
    from ..generation.request import GenerateRequest, run

    run(from_namespace(GenerateRequest, namespace))
    return 0


def _encode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("references", nargs="+", metavar="REF", help="reference images")
    _config_arguments("..generation.encode", "EncodeConfig")(parser)


def _encode(namespace: argparse.Namespace) -> int:
    from ..generation.encode import EncodeConfig, run_encode

    run_encode(from_namespace(EncodeConfig, namespace))
    return 0


def _tune(namespace: argparse.Namespace) -> int:
    from ..training.tune import TuneConfig, run_tune

    run_tune(from_namespace(TuneConfig, namespace))
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


class _TorchvisionNote(logging.Filter):
    """Drops transformers' note that an image processor falls back to its PIL implementation because
    torchvision is missing: imprompt uses the PIL processors by design (torchvision would pull a CUDA
    torch here), and diffusers' imports trigger the note for processors we never use."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def quiet_libraries() -> None:
    """For commands that load models: no library progress bars or torchvision notes on normal use
    (the command prints its own progress). Process-wide, so only the CLI, which owns the process, calls it."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.get_logger()  # makes transformers install its handler
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_TorchvisionNote())
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _models(namespace: argparse.Namespace) -> int:
    from ..models.listing import ModelsConfig, list_models

    list_models(from_namespace(ModelsConfig, namespace))
    return 0


def _demo(namespace: argparse.Namespace) -> int:
    from ..demo import DemoConfig, run

    return run(from_namespace(DemoConfig, namespace))


def _serve(namespace: argparse.Namespace) -> int:
    from ..server.config import ServerConfig

    try:
        from ..server.serve import serve
    except ImportError as err:  # the [serve] extra is not installed
        raise ValueError(f"imprompt serve needs the web packages ({err.name} is missing): "
                         "pip install 'imprompt[serve]'") from None
    return serve(from_namespace(ServerConfig, namespace))


def _grid(namespace: argparse.Namespace) -> int:
    from ..generation.grid import GridConfig, run_grid

    run_grid(from_namespace(GridConfig, namespace))
    return 0


def _batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", nargs="?", help="YAML file of BatchConfig fields (generate options + the job lists)")
    _config_arguments("..generation.batch", "BatchConfig", all_optional=True)(parser)


def _batch(namespace: argparse.Namespace) -> int:
    from ..config import load_config
    from ..generation.batch import BatchConfig, run_batch

    overrides = {k: v for k, v in vars(namespace).items() if k != "workflow"}
    run_batch(load_config(BatchConfig, namespace.workflow, overrides))
    return 0


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="A B, or A B C for add_difference (.safetensors)")
    _config_arguments("..models.merge", "MergeConfig")(parser)


def _extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs=2, metavar="MODEL", help="BASE TUNED (diffusers folders or single files)")
    _config_arguments("..models.lora_extract", "ExtractConfig")(parser)


def _extract(namespace: argparse.Namespace) -> int:
    import dataclasses

    from ..models.lora_extract import ExtractConfig, extract_lora

    base, tuned = namespace.models
    extract_lora(dataclasses.replace(from_namespace(ExtractConfig, namespace), base=base, tuned=tuned))
    return 0


def _merge(namespace: argparse.Namespace) -> int:
    import dataclasses

    from ..models.merge import MergeConfig, merge_checkpoints

    models = namespace.models
    if len(models) not in (2, 3):
        raise ValueError(f"imprompt merge takes 2 or 3 models (A B [C]), got {len(models)}")
    config = dataclasses.replace(from_namespace(MergeConfig, namespace), a=models[0], b=models[1],
                                 c=models[2] if len(models) == 3 else None)
    merge_checkpoints(config)
    return 0


def _config_arguments(module: str, name: str, **kwargs) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        add_arguments(parser, getattr(importlib.import_module(module, __package__), name), **kwargs)

    return add


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML file with TrainConfig fields")
    _config_arguments("..training.config", "TrainConfig", all_optional=True)(parser)


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image written by imprompt or AUTOMATIC1111 (PNG, JPEG or WebP)")
    parser.add_argument("--json", action="store_true", help="print as JSON")


def _delegated(module: str) -> Callable[[list[str]], int]:
    """A sub-command with a parser of its own: ``main(argv)`` in ``module`` (which runs through the same
    :func:`imprompt.errors.guarded`, naming its own sub-command, e.g. ``imprompt toy build``)."""

    def run(argv: list[str]) -> int:
        return importlib.import_module(module, __package__).main(argv)

    return run


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None  # None: the command parses its own argv
    run: Callable
    loads_models: bool = True


COMMANDS = (
    Command("generate", "generate images from image + text prompts",
            "Generate images with IP-Adapter image prompts. Per-adapter options take VALUE (all adapters) or "
            "N=VALUE (adapter N, in --adapter order).", _config_arguments("..generation.request", "GenerateRequest"),
            _generate),
    Command("encode", "encode references once into an embeds file for --embeds (.safetensors / .ipadpt)",
            "Encode reference images into the image features an adapter reads (conditional and unconditional, in "
            "diffusers' ip_adapter_image_embeds layout, with metadata) and write them; `imprompt generate --embeds "
            "FILE` then uses them instead of --image.", _encode_arguments, _encode),
    Command("tune", "tune an image prompt on its references in a few steps (E4T-style), written as embeds",
            "Start from the adapter's features for the references and tune them for a few steps on the references "
            "themselves (base model and adapter frozen); write them as an embeds file that `imprompt generate "
            "--embeds FILE` uses like an image prompt.", _config_arguments("..training.tune", "TuneConfig"), _tune),
    Command("train", "train an IP-Adapter (paper recipe; cached features; resumable)",
            "Train an IP-Adapter. Fields come from CONFIG.yaml; flags override them.", _train_arguments, _train),
    Command("info", "show the generation parameters stored in a PNG, JPEG or WebP",
            "Show the generation parameters (AUTOMATIC1111's format) stored in an image.", _info_arguments, _info,
            loads_models=False),
    Command("models", "list the models found in A1111 / Forge / ComfyUI folders, by kind",
            "List checkpoints, IP-Adapters (variant, base, encoder needed), image encoders, LoRAs, embeddings, "
            "ControlNets and VAEs found under --models-dir, and what cannot be used and why.",
            _config_arguments("..models.listing", "ModelsConfig"), _models, loads_models=False),
    Command("eval", "evaluate adapters and baselines: CLIP-I, CLIP-T, toy attributes (imprompt eval --help)", "",
            None, _delegated("..evaluation.cli")),
    Command("toy", "build the toy world's models (imprompt toy build --help)", "", None, _delegated("..toy.cli")),
    Command("serve", "the web UI and an AUTOMATIC1111-compatible API (http://127.0.0.1:7860)",
            "Serve the web UI at / and the HTTP APIs (A1111's /sdapi/v1, the ControlNet extension's /controlnet, "
            "imprompt's /v1 with docs at /docs) over the models in --models-dir, or the bundled toy model.",
            _config_arguments("..server.config", "ServerConfig"), _serve),
    Command("grid", "X/Y/Z plots over any generation field, as A1111's script (imprompt grid --help)",
            "Generate one image per combination of --x / --y / --z values (FIELD=V1,V2,...; prompt_sr=FIND,A,B "
            "for prompt search/replace), each with its PNG info, and one labelled grid per Z value. Every "
            "`imprompt generate` option is accepted for what the axes leave unchanged.",
            _config_arguments("..generation.grid", "GridConfig"), _grid),
    Command("batch", "run a workflow: references x prompts x scales x control images x seeds, resumable",
            "Run a batch workflow from WORKFLOW.yaml (any generate option, plus references, prompts, scales, "
            "control_images, seeds, name). Finished images are skipped on a rerun; `accelerate launch -m imprompt "
            "batch ...` splits the jobs across processes.", _batch_arguments, _batch),
    Command("merge", "merge checkpoints as A1111's Checkpoint Merger does (weighted sum, add difference, block weights)",
            "Merge two or three single-file checkpoints: weighted_sum A*(1-M) + B*M, add_difference A + (B-C)*M, "
            "optionally with per-block weights (--blocks) as the Merge Block Weighted extension; streamed "
            "tensor by tensor, written atomically with A1111's merge metadata.", _merge_arguments, _merge),
    Command("extract-lora", "a LoRA from the difference of a fine-tuned model and its base (SVD, kohya format)",
            "Factor TUNED - BASE layer by layer (truncated SVD) into a kohya-format LoRA that A1111, ComfyUI, "
            "diffusers and `<lora:NAME:W>` read; prints how much of the difference the rank keeps.",
            _extract_arguments, _extract),
    Command("demo", "the demo on the bundled toy world (what `make demo` runs)",
            "Generate from the bundled toy world's references and print how well each image matches.",
            _config_arguments("..demo", "DemoConfig"), _demo),
)
BY_NAME = {c.name: c for c in COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the sub-commands' names and one-line help, none of their flags."""
    parser = argparse.ArgumentParser(prog="imprompt", description="Image prompts (IP-Adapter) for Stable Diffusion",
                                     epilog="`imprompt COMMAND --help` shows a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub.add_parser(command.name, help=command.help, add_help=False)
    return parser


def command_parser(command: Command) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"imprompt {command.name}", description=command.description or command.help)
    command.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=os.environ.get("IMPROMPT_LOG", "WARNING"))
    if not argv or argv[0] not in BY_NAME:
        build_parser().parse_args(argv)  # prints the usage or the help, and exits
        return 2
    command, rest = BY_NAME[argv[0]], argv[1:]

    def run() -> int:
        if command.loads_models:
            quiet_libraries()
        if command.add_arguments is None:
            return command.run(rest)
        result = command.run(command_parser(command).parse_args(rest))
        return result if isinstance(result, int) else 0

    return guarded(command.name, run)


if __name__ == "__main__":
    sys.exit(main())
