"""imprompt.files and image decoding: atomic writes with the umask's permissions, guarded reads."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imprompt.encoding import ImageInputError, decode_image, load_image
from imprompt.files import (
    PickleRefusedError,
    UnsafeFileError,
    atomic_dir,
    atomic_path,
    atomic_write,
    load_torch_weights,
    read_regular_file,
    remove_debris,
    write_text,
)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_get_the_umask_permissions(tmp_path, umask_022):
    # mkstemp creates 0600 files; a plain open() under umask 022 gives 0644, and so must we.
    write_text(tmp_path / "a.txt", "hello")
    with atomic_path(tmp_path / "b.png") as tmp:
        Image.new("RGB", (4, 4)).save(tmp, format="PNG")
    with atomic_dir(tmp_path / "folder") as staging:
        (staging / "x").write_text("x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
    os.umask(0o077)
    write_text(tmp_path / "c.txt", "private")
    assert (tmp_path / "c.txt").stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_atomic_dir_replaces_a_folder_whole(tmp_path):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "old").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(folder) as staging:
            (staging / "new").write_text("new")
            raise ValueError("stage failed")
    assert [p.name for p in folder.iterdir()] == ["old"]
    with atomic_dir(folder) as staging:
        (staging / "new").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]


def test_debris_of_a_killed_writer_is_removed(tmp_path):
    # A writer killed by SIGKILL cannot clean up: its temporary file stays until the next run.
    code = ("import os, sys; from imprompt.files import atomic_write\n"
            f"with atomic_write({str(tmp_path / 'x.png')!r}) as f:\n"
            "    f.write(b'partial'); f.flush(); os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", code], timeout=60)
    debris = list(tmp_path.glob(".x.png.*.tmp"))
    assert len(debris) == 1 and not (tmp_path / "x.png").exists()
    assert remove_debris(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_special_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "image.png"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        read_regular_file(fifo)  # would block forever in open() + read()
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ImageInputError, match="not a regular file"):
        load_image(zero)
    with pytest.raises(ImageInputError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ImageInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(UnsafeFileError, match="over the"):
        read_regular_file(big, max_bytes=1000)


def _png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose header is rewritten to declare another size (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    # IHDR is the first chunk: 8-byte signature, 4-byte length, 'IHDR', then width and height.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bombs_are_refused_before_decoding(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(50000, 50000))
    assert bomb.stat().st_size < 200
    with pytest.raises(ImageInputError, match="bomb.png declares .*over the 40 MP limit"):
        load_image(bomb)
    monkeypatch.setenv("IMPROMPT_MAX_IMAGE_PIXELS", "63")
    with pytest.raises(ImageInputError, match="IMPROMPT_MAX_IMAGE_PIXELS"):
        decode_image(_png_declaring(8, 8), name="small.png")
    monkeypatch.setenv("IMPROMPT_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(ImageInputError, match="whole number"):
        decode_image(_png_declaring(8, 8))


def test_sixteen_bit_images_keep_their_values(tmp_path):
    # PIL's convert('RGB') clips 16-bit greyscale at 255: a mid-grey reference became all white.
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)
    path = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(path)  # uint16 -> mode I;16
    assert Image.open(path).mode in ("I;16", "I")
    rgb = np.asarray(load_image(path))
    expected = (ramp >> 8).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    eight = tmp_path / "grey8.png"
    Image.fromarray(expected).save(eight)
    assert np.array_equal(np.asarray(load_image(eight)), rgb)


def test_corrupt_images_get_one_clear_error(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageInputError, match="cannot read image notes.png"):
        load_image(text)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[:200])
    with pytest.raises(ImageInputError, match="cut.jpg"):
        load_image(truncated)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_load_weights_only_and_never_advise_otherwise(tmp_path):
    import torch

    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2), "step": 3}, good)
    assert load_torch_weights(good)["step"] == 3
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Payload(marker)}, evil)
    with pytest.raises(PickleRefusedError) as refused:
        load_torch_weights(evil)
    assert not marker.exists()
    assert "weights_only=False" not in str(refused.value) and "\n" not in str(refused.value)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(PickleRefusedError, match="empty"):
        load_torch_weights(empty)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(PickleRefusedError, match="truncated"):
        load_torch_weights(cut)


def test_debris_of_a_live_writer_is_kept(tmp_path):
    # Two runs writing into one folder: the second must not delete the first's file in progress.
    with atomic_write(tmp_path / "a.png") as f:
        f.write(b"in progress")
        assert remove_debris(tmp_path) == 0
        assert len(list(tmp_path.glob(".a.png.*.tmp"))) == 1
    assert (tmp_path / "a.png").read_bytes() == b"in progress"


def test_image_errors_do_not_show_buffer_addresses():
    with pytest.raises(ImageInputError) as err:
        decode_image(b"hello", name="image x.png")
    assert "BytesIO" not in str(err.value) and "cannot read image x.png" in str(err.value)


def test_exclusive_writes_never_replace_a_file(tmp_path):
    target = tmp_path / "00000-1.png"
    target.write_bytes(b"first run's image")
    with pytest.raises(FileExistsError):
        with atomic_path(target, exclusive=True) as tmp:
            tmp.write_bytes(b"second run's image")
    assert target.read_bytes() == b"first run's image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-1.png"]


def test_numbered_pngs_skip_names_another_run_took(tmp_path):
    from imprompt.generation.outputs import save_numbered_png

    (tmp_path / "00003-9.png").write_bytes(b"taken")
    path, index = save_numbered_png(tmp_path, 3, 9, Image.new("RGB", (4, 4)), "a prompt")
    assert (path.name, index) == ("00004-9.png", 4)
    assert (tmp_path / "00003-9.png").read_bytes() == b"taken"


def test_output_folders_are_checked_before_any_work(tmp_path):
    from imprompt.files import check_writable_folder
    from imprompt.training.config import TrainConfig
    from imprompt.training.trainer import train

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(UnsafeFileError, match="--output-dir .*taken' is a file"):
        check_writable_folder(a_file, "--output-dir")
    with pytest.raises(UnsafeFileError, match="cannot be made: .*taken' is a file"):
        check_writable_folder(a_file / "sub", "--output")
    check_writable_folder(tmp_path / "new" / "deeper")  # creatable: fine, and nothing is made
    assert not (tmp_path / "new").exists()
    # Training refuses such a folder before looking at the (missing) model or data.
    config = TrainConfig(model=str(tmp_path / "no-model"), image_encoder=str(tmp_path / "no-encoder"),
                         data=str(tmp_path / "no-data"), output_dir=str(a_file))
    with pytest.raises(UnsafeFileError, match="is a file"):
        train(config)
