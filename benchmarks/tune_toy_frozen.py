"""`imprompt tune` on the bundled toy model, measured: the frozen step (what `tune` does) against a step on
weights left with ``requires_grad`` on, as loaded (what it did before it froze them), interleaved.

    .venv/bin/python benchmarks/tune_toy_frozen.py [--repeats 4] [--steps 15] [--threads 1]

Each repeat tunes the same reference for ``--steps`` steps both ways (order alternating), on one process.
The features must come out the same bit for bit (the gradient to them does not depend on the weights'
flags); the script checks that, then prints the median seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from imprompt import toy
from imprompt.generation.request import GenerateRequest, load_models, prepare, read_inputs
from imprompt.training import tune as tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    paths = toy.toy_paths()
    reference = str(sorted(paths["references"].glob("*.png"))[0])
    request, options, catalog = prepare(GenerateRequest(adapter=[str(paths["adapter"])], image=[reference],
                                                        dtype="float32"), lambda message: None)
    models, inputs = load_models(request, options, catalog), read_inputs(request, options)
    frozen = tuning.frozen
    ways = {"frozen": frozen, "weights with grad": lambda *modules: contextlib.nullcontext()}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    features = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name in (list(ways) if repeat % 2 else list(ways)[::-1]):
            tuning.frozen = ways[name]
            try:
                start = time.perf_counter()
                result = tuning.tune_loaded(models, inputs.prompts[0].images, "", tuning.TuneOptions(steps=args.steps))
                elapsed = time.perf_counter() - start
            finally:
                tuning.frozen = frozen
            models.pipe.unet.zero_grad(set_to_none=True)
            if repeat:
                seconds[name].append(elapsed)
            features[name] = result.features.conditional
    assert torch.equal(*features.values()), "the two ways gave different features"
    print(f"toy model, base adapter, {args.steps} steps at batch {tuning.TuneOptions.batch}, {args.threads} thread(s), "
          f"median of {args.repeats}:")
    for name, values in seconds.items():
        print(f"  {name:18s} {statistics.median(values):6.2f} s ({', '.join(f'{v:.2f}' for v in values)})")
    ratio = statistics.median(seconds["weights with grad"]) / statistics.median(seconds["frozen"])
    print(f"  frozen is {ratio:.2f}x faster; features identical bit for bit")


if __name__ == "__main__":
    main()
