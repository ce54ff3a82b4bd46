"""Typed configs: every field coerced and checked from its type hint, one-line errors for bad files."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Literal

import pytest

from imprompt.config import ConfigError, add_arguments, from_namespace, load_config, option
from imprompt.evaluation.config import EvalConfig
from imprompt.training.config import TrainConfig


@dataclass
class Example:
    count: int = field(default=1, metadata=option("how many"))
    rate: float = field(default=0.5, metadata=option("a rate"))
    flag: bool = field(default=True, metadata=option("a switch"))
    name: str = field(default="", metadata=option("a name"))
    mode: Literal["fast", "exact"] = field(default="fast", metadata=option("how"))
    colour: str = field(default="red", metadata=option("a colour", choices=["red", "blue"]))
    limit: int | None = field(default=None, metadata=option("an optional limit"))
    paths: list[str] = field(default_factory=list, metadata=option("paths"))
    scales: list[float] = field(default_factory=list, metadata=option("scales"))
    extra: dict = field(default_factory=dict)  # library-only: no option(), no flag


def yaml_file(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_values_from_yaml_are_coerced_to_their_field_types(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string and "3" is a string: both become what the field says.
    cfg = load_config(TrainConfig, yaml_file(tmp_path, "learning_rate: 1e-4\nmax_steps: '3'\nprogress: 'no'\n"
                                                       "sample_images: ref.png\nnum_tokens: null\n"))
    assert cfg.learning_rate == 1e-4 and type(cfg.learning_rate) is float
    assert cfg.max_steps == 3 and type(cfg.max_steps) is int
    assert cfg.progress is False
    assert cfg.sample_images == ["ref.png"] and cfg.num_tokens is None
    evaluation = load_config(EvalConfig, yaml_file(tmp_path, "steps: '3'\nscales: 0.5\nmethods: t:text_only\n"))
    assert evaluation.steps == 3 and evaluation.scales == [0.5] and evaluation.methods[0].kind == "text_only"


@pytest.mark.parametrize("text, value", [("yes", True), ("no", False), ("'no'", False), ("'yes'", True),
                                         ("'true'", True), ("'False'", False), ("1", True), ("0", False),
                                         ("'0'", False), ("true", True), ("off", False)])
def test_booleans(tmp_path, text, value):
    assert load_config(Example, yaml_file(tmp_path, f"flag: {text}\n")).flag is value


@pytest.mark.parametrize("text, message", [
    ("batch_size: four", r"batch_size must be a whole number \(int\), got 'four'"),
    ("max_steps: 4.7", r"max_steps must be a whole number \(int\), got 4.7"),
    ("progress: maybe", r"progress must be true or false .*got 'maybe'"),
    ("progress: 2", r"progress must be true or false .*got 2"),
    ("learning_rate: fast", r"learning_rate must be a number \(float\), got 'fast'"),
    ("learning_rate: .nan", r"learning_rate must be a finite number, got nan"),
    ("variant: huge", r"variant must be one of linear, plus, full, shared; got 'huge'"),
    ("mixed_precision: fp8", r"mixed_precision must be one of no, fp16, bf16; got 'fp8'"),
    ("model: [a, b]", r"model must be text \(str\), got \['a', 'b'\]"),
    ("max_steps:", r"max_steps must be a whole number \(int\), got null; remove the line to use the default"),
    ("sample_images: [a.png, {x: 1}]", r"sample_images\[1\] must be text \(str\), got \{'x': 1\}"),
])
def test_bad_values_name_the_field_the_value_and_the_type(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TrainConfig, yaml_file(tmp_path, text + "\n"))
    assert "config.yaml" in str(err.value) and "\n" not in str(err.value)


def test_literal_optional_and_list_fields(tmp_path):
    cfg = load_config(Example, yaml_file(tmp_path, "mode: exact\nlimit: null\npaths: [a, b]\nscales: ['0.5', 1]\n"))
    assert cfg.mode == "exact" and cfg.limit is None and cfg.paths == ["a", "b"] and cfg.scales == [0.5, 1.0]
    assert load_config(Example, None, {"limit": "7", "paths": "one"}) == Example(limit=7, paths=["one"])
    with pytest.raises(ConfigError, match=r"mode must be one of fast, exact; got 'slow'"):
        load_config(Example, yaml_file(tmp_path, "mode: slow\n"))
    with pytest.raises(ConfigError, match=r"colour must be one of red, blue; got 'green'"):
        load_config(Example, None, {"colour": "green"})
    with pytest.raises(ConfigError, match=r"limit must be a whole number \(int\) or null, got 'many'"):
        load_config(Example, yaml_file(tmp_path, "limit: many\n"))


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed\n", r"config.yaml is not valid YAML: .* \(line \d+, column \d+\)"),
    ("- a\n- b\n", r"config.yaml: expected a mapping of config fields \(name: value\), found a list"),
    ("learning_rte: 1\n", r"config.yaml: unknown config field\(s\) \['learning_rte'\]; known fields: "),
    ("1: x\n", r"unknown config field\(s\) \['1'\]"),
    ("model: \xff\n", None),
])
def test_bad_files_give_one_line(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    if message is None:
        path.write_bytes(b"model: \xff\n")
        message = r"config.yaml is not UTF-8 text"
    else:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TrainConfig, path)
    assert "\n" not in str(err.value)


def test_missing_and_special_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"is a directory"):
        load_config(TrainConfig, tmp_path)
    os.mkfifo(tmp_path / "fifo.yaml")  # would block a plain open() forever
    with pytest.raises(ConfigError, match=r"not a regular file"):
        load_config(TrainConfig, tmp_path / "fifo.yaml")
    assert load_config(TrainConfig, yaml_file(tmp_path, "")) == TrainConfig()  # an empty file: all defaults


def test_empty_yaml_file_and_overrides_precedence(tmp_path):
    path = yaml_file(tmp_path, "max_steps: 50\nbatch_size: 2\n")
    cfg = load_config(TrainConfig, path, {"max_steps": 7, "batch_size": None})
    assert cfg.max_steps == 7 and cfg.batch_size == 2  # None: the flag was not given


def test_from_namespace_coerces_too():
    parser = argparse.ArgumentParser()
    add_arguments(parser, Example)
    cfg = from_namespace(Example, parser.parse_args(["--count", "3", "--no-flag", "--paths", "a", "--mode", "exact"]))
    assert cfg == Example(count=3, flag=False, paths=["a"], mode="exact")
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "slow"])  # Literal fields become choices
    assert "--extra" not in parser.format_help()


def _help(argv: list[str], capsys) -> str:
    from imprompt.cli import main

    with pytest.raises(SystemExit):
        main(argv)
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_choices(capsys):
    from imprompt.generation.request import DTYPES
    from imprompt.generation.schedulers import SCHEDULERS

    text = _help(["generate", "--help"], capsys)
    assert "{" + ",".join(SCHEDULERS) + "}" in text and "{" + ",".join(["auto", *DTYPES]) + "}" in text
    text = _help(["train", "--help"], capsys)
    assert "{linear,plus,full,shared}" in text and "{no,fp16,bf16}" in text
    text = _help(["eval", "--help"], capsys)
    assert "{" + ",".join(SCHEDULERS) + "}" in text and "{" + ",".join(["auto", *DTYPES]) + "}" in text


@pytest.mark.parametrize("command", ["train", "eval"])
def test_commands_report_bad_config_files_in_one_line(tmp_path, capsys, command):
    from imprompt.cli import main

    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    (tmp_path / "typed.yaml").write_text("steps: four\n" if command == "eval" else "max_steps: four\n")
    for name, message in (("broken.yaml", "is not valid YAML"), ("missing.yaml", "does not exist"),
                          ("typed.yaml", "must be a whole number (int), got 'four'")):
        assert main([command, str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
