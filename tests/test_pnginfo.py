"""A1111 generation parameters: writing, reading (PNG text, JPEG/WebP EXIF), linear capped parsing."""

import json
import os
import random
import re
import signal
import struct

import pytest
from PIL import Image

from imprompt.generation.pnginfo import (
    MAX_PARAMETERS_CHARS,
    TRUNCATED,
    decode_user_comment,
    escape_controls,
    format_parameters,
    json_safe,
    parse_parameters,
    read_parameters,
    save_png,
    settings_pairs,
)


def test_round_trip_with_quoting():
    settings = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": 42, "Size": "512x768",
                "IP-Adapter 0": 'Model: ip-adapter_sd15, Weight: 0.6, Images: a "b".png', "Skipped": None}
    text = format_parameters("a cat,\nsitting", "ugly, blurry", settings)
    assert 'IP-Adapter 0: "Model: ip-adapter_sd15, Weight: 0.6, Images: a \\"b\\".png"' in text
    assert "Skipped" not in text
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "a cat,\nsitting"
    assert parsed["Negative prompt"] == "ugly, blurry"
    assert parsed["IP-Adapter 0"] == settings["IP-Adapter 0"]
    assert parsed["Seed"] == "42" and parsed["Sampler"] == "DPM++ 2M Karras"


def test_reads_what_automatic1111_writes():
    text = ("masterpiece, a knight\nNegative prompt: lowres\nSteps: 25, Sampler: Euler a, Schedule type: Automatic, "
            "CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
            'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15 [6a3f6166], Weight: 0.6", Version: v1.10.1')
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "masterpiece, a knight"
    assert parsed["Sampler"] == "Euler a"
    assert parsed["ControlNet 0"].startswith("Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15")
    assert parsed["Version"] == "v1.10.1"


def test_prompt_only_text_has_no_settings():
    assert parse_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_png_chunk_written_atomically(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", "p\nSteps: 1, Seed: 2, Size: 4x4")
    assert read_parameters(path) == "p\nSteps: 1, Seed: 2, Size: 4x4"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# --------------------------------------------------------------------------------------------------
# JPEG / WebP: the EXIF UserComment A1111 writes
# --------------------------------------------------------------------------------------------------


def _exif_with_user_comment(comment: bytes) -> bytes:
    """EXIF as piexif.dump writes it for {"Exif": {UserComment: ...}}: big-endian TIFF, IFD0 holding
    only the Exif IFD pointer, the Exif IFD holding only UserComment (type UNDEFINED)."""
    ifd0 = 8
    exif_ifd = ifd0 + 2 + 12 + 4
    data = exif_ifd + 2 + 12 + 4
    tiff = b"MM\x00\x2a" + struct.pack(">I", ifd0)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", 0x8769, 4, 1, exif_ifd) + struct.pack(">I", 0)
    tiff += struct.pack(">H", 1) + struct.pack(">HHII", 0x9286, 7, len(comment), data) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + tiff + comment


A1111_TEXT = ("a knight, détaillé\nNegative prompt: lowres\nSteps: 25, Sampler: Euler a, CFG scale: 7, Seed: 1234, "
              "Size: 512x512, Model: v1-5-pruned-emaonly")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_reads_a1111_parameters_from_jpeg_and_webp(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    comment = b"UNICODE\x00" + A1111_TEXT.encode("utf_16_be")  # piexif UserComment.dump(..., "unicode")
    Image.new("RGB", (8, 8)).save(path, format=fmt, exif=_exif_with_user_comment(comment))
    assert read_parameters(path) == A1111_TEXT
    parsed = parse_parameters(read_parameters(path))
    assert parsed["Prompt"] == "a knight, détaillé" and parsed["Seed"] == "1234"


def test_user_comment_encodings():
    assert decode_user_comment(b"UNICODE\x00" + "ab".encode("utf_16_le")) == "ab"  # little-endian writers
    assert decode_user_comment(b"ASCII\x00\x00\x00Steps: 1\x00") == "Steps: 1"
    assert decode_user_comment("Steps: 1".encode()) == "Steps: 1"  # no prefix: read as UTF-8, as A1111 does


def test_jpeg_without_parameters(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.jpg")
    assert read_parameters(tmp_path / "plain.jpg") is None


# --------------------------------------------------------------------------------------------------
# Parsing is linear, capped, and reads what A1111's pattern reads
# --------------------------------------------------------------------------------------------------


def test_settings_line_reads_what_a1111s_pattern_reads():
    pattern = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')  # the old, quadratic one
    rng = random.Random(0)
    for _ in range(3000):
        line = "".join(rng.choice('ab :,"\\-\t/+!') for _ in range(rng.randint(0, 16)))
        expected = [(k.strip(), v) for k, v in pattern.findall(line)]
        assert [(k.strip(), v) for k, v in settings_pairs(line)] == expected, line


def test_a_megabyte_line_parses():
    # A long run of key characters with no colon made the old pattern quadratic (2 s at 16k characters;
    # this line would take hours). The alarm is a generous bound so that a regression fails, not hangs.
    line = "word " * 200_000 + ", Steps: 20, Sampler: Euler, Seed: 3, Size: 8x8"

    def hung(signum, frame):
        raise TimeoutError("parse_parameters did not finish a 1 MB line in 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        result = parse_parameters("a prompt\n" + line, max_chars=2_000_000)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert result == {"Prompt": "a prompt", "Negative prompt": "", "Steps": "20", "Sampler": "Euler",
                      "Seed": "3", "Size": "8x8"}


def test_parameters_are_capped_and_say_so():
    text = "x" * (MAX_PARAMETERS_CHARS * 3) + "\nSteps: 1, Seed: 2, Size: 4x4"
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "x" * MAX_PARAMETERS_CHARS
    assert parsed[TRUNCATED].startswith(f"the parameters text is {len(text)} characters; only the first")
    assert TRUNCATED not in parse_parameters("p\nSteps: 1, Seed: 2, Size: 4x4")


def test_control_characters_are_escaped_for_the_terminal():
    assert escape_controls("red\x1b[2J\rcat\u202e\nok é") == "red\\x1b[2J\\rcat\\u202e\\nok é"
    dumped = json_safe(json.dumps({"p": "a\x1b\x85\u202eé"}, indent=2, ensure_ascii=False))
    assert "\x1b" not in dumped and "\x85" not in dumped and "\u202e" not in dumped and "é" in dumped
    assert json.loads(dumped) == {"p": "a\x1b\x85\u202eé"}


def test_png_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", "p")
    finally:
        os.umask(old)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o644
