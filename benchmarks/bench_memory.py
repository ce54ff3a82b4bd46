"""Peak memory of one generation: plain diffusers vs diffusers' IP-Adapter vs ``imprompt generate``.

Each contender runs in a process of its own, started fresh for every measurement, so that each peak
resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which the child prints as its last
line) is that contender's alone: a process's peak never goes down, so two contenders in one process
would hide each other. The parent never imports torch and builds nothing (the models are written by a
``prepare`` child of their own): a child forked from a large parent can inherit the parent's
resident pages in its peak on Linux, and the parent stays small so that none is there to inherit.
The child also prints ``VmHWM`` from ``/proc/self/status`` as a check on the same figure.

What is written once into ``--work`` (nothing is downloaded; random weights, built in code by
``bench_generation.py``'s builders):

* ``model/``          -- the pipeline as a diffusers folder (``save_pretrained``, safetensors),
* ``image_encoder/``  -- the CLIP vision tower (with its image processor config),
* ``adapter.safetensors`` -- a base IP-Adapter (linear projection, 4 tokens) in the official flat layout,
* ``reference.png``   -- the reference image.

The contenders, 10 steps by default, same prompt, seed, guidance and image scale:

* ``plain``        -- ``StableDiffusionPipeline.from_pretrained(model)`` and one generation, no adapter;
* ``diffusers-ip`` -- the same plus ``CLIPVisionModelWithProjection.from_pretrained(image_encoder)``,
  ``load_ip_adapter`` of the same file, ``set_ip_adapter_scale`` and ``ip_adapter_image``;
* ``imprompt``     -- the real command line, in the child's process: ``imprompt.cli.main(["generate",
  "--model", ..., "--adapter", ..., "--image", ..., "--image-encoder", ...])``, writing a PNG.

The contenders are interleaved round by round (``--repeats`` rounds). One torch thread each.

    .venv/bin/python benchmarks/bench_memory.py [--repeats 2] [--steps 10] [--quick] [--work DIR] [--stages]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTENDERS = ("plain", "diffusers-ip", "imprompt")
MARK = "BENCH_MEMORY "  # prefix of the lines a child reports on


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS: resident now; VmHWM: its peak) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def stage(name: str) -> None:
    """With --stages: the resident set now and its peak so far, where the child has got to."""
    if os.environ.get("BENCH_MEMORY_STAGES"):
        print(f"  stage {name:32} VmRSS {status_kb('VmRSS') / 1024:8.1f} MB   VmHWM {status_kb('VmHWM') / 1024:8.1f} MB",
              file=sys.stderr, flush=True)


def report(**values) -> None:
    print(MARK + json.dumps(values), flush=True)


# --- the children ------------------------------------------------------------------------------------

def quiet_torch():
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    return torch


def prepare(work: Path, quick: bool) -> None:
    """Build the model, encoder, adapter and reference once and write them as a user would have them."""
    quiet_torch()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_generation as bg

    from imprompt.adapter.checkpoint import save_adapter

    shape = bg.QUICK if quick else bg.FULL
    pipe = bg.build_pipeline(shape)
    pipe.save_pretrained(work / "model", safe_serialization=True)
    encoder = bg.build_image_encoder(shape)
    encoder.save_pretrained(work / "image_encoder", safe_serialization=True)
    bg.processor(shape).save_pretrained(work / "image_encoder")
    save_adapter(bg.build_adapter(pipe.unet, "base", shape), work / "adapter.safetensors")
    bg.reference_image().save(work / "reference.png")

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    sizes = {"unet": params(pipe.unet), "vae": params(pipe.vae), "text_encoder": params(pipe.text_encoder),
             "image_encoder": params(encoder)}
    from safetensors import safe_open

    with safe_open(str(work / "adapter.safetensors"), "pt") as f:
        sizes["adapter"] = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    (work / "sizes.json").write_text(json.dumps({
        "shape": "quick" if quick else "full", "params": sizes, "side": shape.latent * pipe.vae_scale_factor,
        # The children read the call's settings from here, so that plain and diffusers-ip import neither
        # imprompt nor bench_generation (which imports imprompt): their peaks hold diffusers' imports only.
        "call": {"prompt": bg.PROMPT, "seed": bg.SEED, "scale": bg.SCALE, "guidance": bg.GUIDANCE}}))
    (work / "ready").write_text("ok\n")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def call_settings(work: Path) -> tuple[str, int, float, float]:
    call = json.loads((work / "sizes.json").read_text())["call"]
    return call["prompt"], call["seed"], call["scale"], call["guidance"]


def run_plain(work: Path, steps: int, out: Path) -> None:
    torch = quiet_torch()
    PROMPT, SEED, _, GUIDANCE = call_settings(work)
    from diffusers import StableDiffusionPipeline

    stage("imported")
    pipe = StableDiffusionPipeline.from_pretrained(work / "model", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    stage("pipeline loaded")
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    stage("generated")
    image.save(out)


def run_diffusers_ip(work: Path, steps: int, out: Path) -> None:
    torch = quiet_torch()
    PROMPT, SEED, SCALE, GUIDANCE = call_settings(work)
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPVisionModelWithProjection

    stage("imported")
    encoder = CLIPVisionModelWithProjection.from_pretrained(work / "image_encoder")
    stage("image encoder loaded")
    pipe = StableDiffusionPipeline.from_pretrained(work / "model", image_encoder=encoder, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    stage("pipeline loaded")
    pipe.load_ip_adapter(str(work), subfolder="", weight_name="adapter.safetensors", image_encoder_folder=None)
    pipe.set_ip_adapter_scale(SCALE)
    stage("adapter loaded")
    ref = Image.open(work / "reference.png").convert("RGB")
    image = pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, ip_adapter_image=ref,
                 generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    stage("generated")
    image.save(out)


def run_imprompt(work: Path, steps: int, out: Path) -> None:
    quiet_torch()
    PROMPT, SEED, SCALE, GUIDANCE = call_settings(work)

    from imprompt.cli import main as cli

    stage("imported")
    out.parent.mkdir(parents=True, exist_ok=True)
    code = cli(["generate", "--model", str(work / "model"), "--adapter", str(work / "adapter.safetensors"),
                "--image", str(work / "reference.png"), "--image-encoder", str(work / "image_encoder"),
                "--scale", str(SCALE), "--prompt", PROMPT, "--steps", str(steps), "--guidance", str(GUIDANCE),
                "--seed", str(SEED), "--output", str(out.parent)])
    stage("generated")
    if code != 0:
        raise SystemExit(code)


def child(name: str, work: Path, steps: int, quick: bool) -> None:
    start = time.perf_counter()
    if name == "prepare":
        prepare(work, quick)
    else:
        out = work / "out" / name
        out.mkdir(parents=True, exist_ok=True)
        {"plain": run_plain, "diffusers-ip": run_diffusers_ip, "imprompt": run_imprompt}[name](
            work, steps, out / "image.png")
    # On Linux ru_maxrss is in kB.
    report(name=name, ru_maxrss_kb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, vmhwm_kb=status_kb("VmHWM"),
           seconds=time.perf_counter() - start)


# --- the parent: no torch here -----------------------------------------------------------------------

def spawn(name: str, work: Path, steps: int, quick: bool, stages: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    if stages:
        env["BENCH_MEMORY_STAGES"] = "1"
    args = [sys.executable, __file__, "--child", name, "--work", str(work), "--steps", str(steps)]
    if quick:
        args.append("--quick")
    done = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=None if stages else subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{(done.stderr or '')[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per generation (default 10)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each contender once per round (default 2)")
    parser.add_argument("--quick", action="store_true", help="the tiny QUICK model: a smoke run of a few seconds")
    parser.add_argument("--work", help="folder for the model files (default: a temporary folder, removed after); "
                                       "kept and reused when given")
    parser.add_argument("--stages", action="store_true", help="children print VmRSS / VmHWM at each stage")
    parser.add_argument("--only", action="append", choices=CONTENDERS, help="run only these contenders")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error("--steps and --repeats must be at least 1")
    if args.child:
        child(args.child, Path(args.work), args.steps, args.quick)
        return

    wall = time.perf_counter()
    temp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        temp = tempfile.TemporaryDirectory(prefix="bench_memory_")
        work = Path(temp.name)
    try:
        if not (work / "ready").is_file():
            spawn("prepare", work, args.steps, args.quick, args.stages)
        info = json.loads((work / "sizes.json").read_text())
        if info["shape"] != ("quick" if args.quick else "full"):
            raise SystemExit(f"{work} holds the {info['shape']} model; give another --work or match --quick")
        contenders = args.only or list(CONTENDERS)
        peaks: dict[str, list[float]] = {c: [] for c in contenders}
        hwm: dict[str, list[float]] = {c: [] for c in contenders}
        for round_ in range(args.repeats):
            for name in contenders:
                result = spawn(name, work, args.steps, args.quick, args.stages)
                peaks[name].append(result["ru_maxrss_kb"] / 1024)
                hwm[name].append(result["vmhwm_kb"] / 1024)
                print(f"  round {round_ + 1} {name:13} peak RSS {peaks[name][-1]:8.1f} MB (VmHWM "
                      f"{hwm[name][-1]:8.1f} MB), {result['seconds']:.1f} s", flush=True)
        report_table(info, args, peaks)
    finally:
        if temp is not None:
            temp.cleanup()
    print(f"total wall time {time.perf_counter() - wall:.1f} s")


def report_table(info: dict, args, peaks: dict[str, list[float]]) -> None:
    params = info["params"]
    print(f"\n{info['shape']} model, {info['side']}x{info['side']} px, {args.steps} steps, fp32, 1 thread; weights "
          "(parameters, fp32 MB):")
    for name, count in params.items():
        print(f"  {name:14} {count / 1e6:8.1f}M  {count * 4 / 2**20:8.1f} MB")
    print(f"\npeak RSS per process, MB ({args.repeats} runs each)")
    print(f"{'contender':14} {'min':>9} {'median':>9} {'/ plain (min, median)':>22} {'/ diffusers-ip (min, median)':>29}")
    stats = {name: (min(v), statistics.median(v)) for name, v in peaks.items()}

    def ratio(name: str, base: str, width: int) -> str:
        if base not in stats:
            return f"{'-':>{width}}"
        return f"{stats[name][0] / stats[base][0]:.3f}, {stats[name][1] / stats[base][1]:.3f}".rjust(width)

    for name, (low, mid) in stats.items():
        print(f"{name:14} {low:9.1f} {mid:9.1f} {ratio(name, 'plain', 22)} {ratio(name, 'diffusers-ip', 29)}")
    spread = max((max(v) - min(v)) / statistics.median(v) for v in peaks.values())
    print(f"spread: the largest (max - min) / median of one contender's runs is {spread:.0%}; peaks of the same\n"
          "program vary from run to run here (see docs/benchmarks.md), so compare medians over several rounds")


if __name__ == "__main__":
    main()
