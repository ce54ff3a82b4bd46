"""The tuning guard (``imprompt tune --guard``) on the toy world; the guard table of docs/tuning.md.

    PYTHONPATH=src python docs/measure_tuning_guard.py FOLDER N [--previews 2] [--image-encoder DIR] [--threads T]

For each of the first N references of FOLDER: the encoder's features, the same tuned 15 default steps,
and the guard's choice between them (:func:`imprompt.training.tune.preview_similarity`, as ``tune`` makes
it). Each set then generates the same way as docs/measure_tuning.py (seed i, image alone at scale 1,
guidance 3, 20 steps), read by the toy reader. One JSON line per set.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from measure_tuning import ATTRIBUTES, generated, setup, summary  # this folder's script

from imprompt.adapter.attach import attach
from imprompt.generation.embeds import encode_references
from imprompt.toy.judge import attribute_hits, read_many
from imprompt.training.tune import TuneOptions, conditions, preview_similarity, tune_features


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("n", type=int)
    parser.add_argument("--previews", type=int, default=2)
    parser.add_argument("--image-encoder", default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    pipe, adapter, encoder, refs, truth = setup(args)
    options = TuneOptions()
    with attach(pipe.unet, adapter) as attachment:
        encoded = [encode_references([r], encoder, adapter.variant.encoder_output) for r in refs]
        tuned = [tune_features(attachment, f, conditions(pipe, [r]), options).features for f, r in zip(encoded, refs)]
        started = time.perf_counter()
        keep = [preview_similarity(pipe, attachment, encoder, [r], "", t, args.previews, options.seed)
                > preview_similarity(pipe, attachment, encoder, [r], "", e, args.previews, options.seed)
                for r, e, t in zip(refs, encoded, tuned)]
        guard_seconds = (time.perf_counter() - started) / len(refs)
        guarded = [t if k else e for t, e, k in zip(tuned, encoded, keep)]
        for name, features in (("encoder", encoded), ("tuned", tuned), ("guarded", guarded)):
            read = read_many(generated(pipe, attachment, encoder, features, [""] * len(refs), 1.0))
            hits = [attribute_hits(p, t) for p, t in zip(read, truth)]
            print(json.dumps({"folder": args.folder.name, "n": len(refs), "features": name, "kept_tuned": sum(keep),
                              "previews": args.previews, "guard_seconds_per_reference": round(guard_seconds, 2),
                              **{a: summary([h[a] for h in hits]) for a in ATTRIBUTES}}), flush=True)


if __name__ == "__main__":
    main()
