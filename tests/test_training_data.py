"""Training data sources against hostile files: bombs, FIFOs, /dev/zero links, 16-bit PNGs; the data key."""

from __future__ import annotations

import io
import json
import os
import struct
import signal
import tarfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imprompt.training.data import SkipCounter, data_fingerprint, folder_records, json_records, open_source, try_decode


def png_declaring(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR follows the signature, length and 'IHDR'
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def good_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(folder / f"good{i}.png")
        (folder / f"good{i}.txt").write_text(f"good {i}")


def hostile_folder(folder: Path) -> Path:
    good_images(folder)
    (folder / "bomb.png").write_bytes(png_declaring(50000, 50000))
    os.mkfifo(folder / "fifo.png")  # a plain open() + read() blocks forever
    (folder / "zero.png").symlink_to("/dev/zero")  # a plain read() never ends
    (folder / "dir.png").mkdir()
    Image.new("RGB", (16, 16)).save(folder / "fifo_caption.png")
    os.mkfifo(folder / "fifo_caption.txt")
    grey = np.full((16, 16), 128 * 257, dtype=np.uint16)  # 16-bit mid-grey
    Image.fromarray(grey).save(folder / "grey16.png")  # mode I;16
    return folder


@contextmanager
def must_not_block(seconds: int = 30):
    """Turns a hang (a FIFO opened for reading blocks until a writer comes) into a test failure."""
    def fail(*_):
        raise TimeoutError("reading the training data blocked: a special file was opened")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_all(data: Path) -> dict:
    counter = SkipCounter()
    with must_not_block():
        records = list(open_source(str(data), None, counter))
        decoded = {r.key: try_decode(r, counter) for r in records}
    grey = decoded.get("grey16.png")
    return {"decoded": sorted(k for k, v in decoded.items() if v is not None), "skipped": sorted(counter.skipped),
            "grey": float(np.asarray(grey).mean()) if grey is not None else None}


def test_hostile_files_in_a_folder_are_skipped_and_counted(tmp_path):
    result = read_all(hostile_folder(tmp_path / "data"))
    assert result["decoded"] == ["good0.png", "good1.png", "good2.png", "grey16.png"]
    assert result["skipped"] == ["bomb.png", "dir.png", "fifo.png", "fifo_caption.png", "zero.png"]
    assert 126 <= result["grey"] <= 130  # scaled to 8 bits, not clipped to white


def test_hostile_files_in_a_json_list_and_in_shards(tmp_path):
    folder = hostile_folder(tmp_path / "data")
    names = ["good0.png", "bomb.png", "fifo.png", "zero.png", "grey16.png", "missing.png"]
    items = [{"image_file": n, "text": "x"} for n in names] + [{"image_file": "good1.png", "reference_file": "fifo.png"}]
    (folder / "list.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    counter = SkipCounter()
    records = json_records(folder / "list.jsonl", None)
    with must_not_block():
        images = [try_decode(r, counter) for r in records]
        prompts = [try_decode(r, counter, reference=True) if r.read_reference else None for r in records]
    assert [r.key for r, im in zip(records, images) if im is not None] == ["good0.png", "grey16.png", "good1.png"]
    assert prompts[-1] is None
    assert counter.skipped == ["bomb.png", "fifo.png", "zero.png", "missing.png", "good1.png"]

    # A shard holding a bomb: the bomb is skipped, the rest read; a FIFO named .tar is skipped.
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for name, data in (("a.png", (folder / "good0.png").read_bytes()), ("a.txt", b"a"),
                           ("b.png", png_declaring(50000, 50000)), ("b.txt", b"b")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.mkfifo(tmp_path / "shard-001.tar")
    result = read_all(Path(str(tmp_path / "shard-{000..001}.tar")))
    assert result["decoded"] == ["shard-000.tar/a"] and result["skipped"] == sorted(["shard-000.tar/b", str(tmp_path / "shard-001.tar")])


def test_bad_json_lists_give_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("[{\"image_file\": \"a.png\"},\n")
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON: .*line 2"):
        json_records(tmp_path / "bad.json", None)
    (tmp_path / "items.json").write_text("[\"a.png\"]")
    with pytest.raises(ValueError, match=r"items.json item 0: expected an object with 'image_file', found str"):
        json_records(tmp_path / "items.json", None)


def test_the_data_key_follows_the_data(tmp_path):
    folder = tmp_path / "data"
    good_images(folder)
    key = data_fingerprint(str(folder), None, folder_records(folder))
    assert data_fingerprint(str(folder), None, folder_records(folder)) == key
    (folder / "good1.txt").write_text("another caption")
    changed_caption = data_fingerprint(str(folder), None, folder_records(folder))
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "good3.png")
    added = data_fingerprint(str(folder), None, folder_records(folder))
    time.sleep(0.01)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(folder / "good0.png")  # same name and size, new content
    rewritten = data_fingerprint(str(folder), None, folder_records(folder))
    assert len({key, changed_caption, added, rewritten}) == 4

    items = [{"image_file": "good0.png", "text": "a"}]
    (tmp_path / "list.json").write_text(json.dumps(items))
    listed = data_fingerprint(str(tmp_path / "list.json"), str(folder), json_records(tmp_path / "list.json", folder))
    (tmp_path / "list.json").write_text(json.dumps([{**items[0], "reference_file": "good1.png"}]))
    referenced = data_fingerprint(str(tmp_path / "list.json"), str(folder), json_records(tmp_path / "list.json", folder))
    assert listed != referenced != rewritten

    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        tar.add(folder / "good0.png", "good0.png")
    pattern = str(tmp_path / "shard-{000..000}.tar")
    shards = data_fingerprint(pattern, None, open_source(pattern, None, SkipCounter()))
    time.sleep(0.01)
    with tarfile.open(tmp_path / "shard-000.tar", "a") as tar:
        tar.add(folder / "good1.png", "good1.png")
    assert data_fingerprint(pattern, None, open_source(pattern, None, SkipCounter())) != shards
