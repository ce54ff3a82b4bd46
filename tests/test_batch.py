"""imprompt batch: the job product, file names, equality with single runs, resume after a kill, and a
two-process run equal to the one-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imprompt import toy
from imprompt.cli import main
from imprompt.generation.batch import BatchConfig, batch_jobs

torch.set_flush_denormal(True)
REFS = sorted(toy.toy_paths()["references"].glob("*.png"))


def workflow(tmp_path: Path, out: Path, steps: int = 2, refs: int = 2) -> Path:
    folder = tmp_path / "refs"
    folder.mkdir(exist_ok=True)
    for ref in REFS[:refs]:
        (folder / ref.name).write_bytes(ref.read_bytes())
    path = tmp_path / f"wf-{out.name}.yaml"
    path.write_text(f"references: [{folder}]\nprompts: ['a circle', 'a square']\nscales: [0.5, 1.0]\nseeds: [3]\n"
                    f"steps: {steps}\noutput: {out}\nprogress: false\n")
    return path


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_jobs_are_the_product_with_unique_names(tmp_path):
    config = BatchConfig(references=[str(r) for r in REFS[:2]], prompts=["a", "b"], scales=[0.5, 1], seeds=[1, 2])
    jobs = batch_jobs(config)
    assert len(jobs) == 16 and len({j.file_name for j in jobs}) == 16
    assert jobs[1].file_name == f"{REFS[0].stem}-p0-s0.5-cnone-2.png"
    with pytest.raises(ValueError, match="gives .* to two jobs"):
        batch_jobs(BatchConfig(references=[str(r) for r in REFS[:2]], seeds=[1, 2], name="{reference}"))
    with pytest.raises(FileNotFoundError, match="reference 'missing.png' does not exist"):
        batch_jobs(BatchConfig(references=["missing.png"]))


def test_a_job_is_the_image_generate_makes(tmp_path):
    out = tmp_path / "out"
    assert main(["batch", str(workflow(tmp_path, out))]) == 0
    assert len(list(out.glob("*.png"))) == 8
    alone = tmp_path / "alone"
    assert main(["generate", "--image", str(REFS[1]), "--prompt", "a square", "--scale", "1.0", "--seed", "3",
                 "--steps", "2", "--output", str(alone)]) == 0
    (single,) = alone.glob("*.png")
    assert np.array_equal(pixels(single), pixels(out / f"{REFS[1].stem}-p1-s1-cnone-3.png"))


def _batch(args: list[str], launcher: list[str] | None = None, threads: int | None = None) -> subprocess.Popen:
    command = (launcher or [sys.executable, "-m", "imprompt"]) + ["batch", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL if launcher is None else subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow  # three processes that load torch
def test_a_killed_batch_resumes_without_redoing_finished_images(tmp_path):
    clean = tmp_path / "clean"
    assert _batch([str(workflow(tmp_path, clean, steps=30))]).wait(300) == 0
    out = tmp_path / "killed"
    run = _batch([str(workflow(tmp_path, out, steps=30))])
    deadline = time.monotonic() + 240
    while len(list(out.glob("*.png"))) < 2 and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(before) < 8, before
    assert _batch([str(workflow(tmp_path, out, steps=30))]).wait(300) == 0
    after = sorted(out.glob("*.png"))
    assert [p.name for p in after] == sorted(p.name for p in clean.glob("*.png"))
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())  # not redone
    assert all(np.array_equal(pixels(p), pixels(clean / p.name)) for p in after)
    assert not list(out.glob(".*"))  # no debris of the killed write


@pytest.mark.slow  # torchrun starts two processes (accelerate launch --multi_gpu does the same on GPUs)
def test_two_processes_make_the_one_process_files(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    # Each of the two CPU processes gets one thread; a CPU's float sums depend on the thread count, so the
    # one-process run gets one thread too (on GPUs each process has its own device, and this is moot).
    assert _batch([str(workflow(tmp_path, one))], threads=1).wait(300) == 0
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
                "-m", "imprompt"]
    run = _batch([str(workflow(tmp_path, two))], launcher, threads=1)
    output = run.communicate(timeout=300)[0].decode(errors="replace")
    assert run.returncode == 0, output[-2000:]
    assert sorted(p.name for p in two.glob("*.png")) == sorted(p.name for p in one.glob("*.png"))
    assert all(np.array_equal(pixels(p), pixels(one / p.name)) for p in two.glob("*.png"))
    assert sorted(p.name for p in two.glob("summary-*.json")) == ["summary-0.json", "summary-1.json"]
