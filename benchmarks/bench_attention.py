"""Cost of the decoupled attention above the plain attention, per layer, on the mid-size model's shapes.

For each cross-attention shape of ``bench_generation.py``'s SD1.5-shaped model at 384x384 (48x48,
24x24 and 12x12 latents; 160, 320 and 640 channels; 8 heads; batch 2 with guidance; 77 text tokens)
and 4 (base) or 16 (plus) image tokens, times side by side, interleaved, median of ``--repeats``:

* ``plain``     -- the text attention alone, heads merged (what ``AttnProcessor2_0`` computes);
* ``separate``  -- text attention + image attention, each merged to (batch, queries, width), then
  ``text + scale * image`` out of place (imprompt before this change; diffusers' IP-Adapter processor
  does the same);
* ``in place``  -- :func:`imprompt.adapter.attention.decoupled_attention`: the image attention added into
  the text attention in the attention layout, heads merged once.

Prints each contender's milliseconds and the extra over ``plain``; checks that both decoupled versions
agree. ``to_q``/``to_k``/``to_v``/``to_out`` are the same in every contender and left out.

    .venv/bin/python benchmarks/bench_attention.py [--repeats 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from imprompt.adapter.attention import ImageKV, decoupled_attention

SHAPES = ((48 * 48, 160), (24 * 24, 320), (12 * 12, 640))  # (queries, channels) of the mid-size model
HEADS, BATCH, TEXT_TOKENS, SCALE = 8, 2, 77, 0.6


def plain(q, k, v, prompts):
    b, h, n, d = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)


def separate(q, k, v, prompts):
    b, h, n, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)
    for p in prompts:
        image = F.scaled_dot_product_attention(q, p.key, p.value).transpose(1, 2).reshape(b, n, h * d)
        out = out + p.scale * image
    return out


def in_place(q, k, v, prompts):
    return decoupled_attention(q, F.scaled_dot_product_attention(q, k, v), prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contenders = {"plain": plain, "separate": separate, "in place": in_place}
    print(f"{'queries':>7} {'width':>5} {'tokens':>6} " + " ".join(f"{n:>10}" for n in contenders)
          + f" {'extra, separate':>16} {'extra, in place':>16} {'saved':>6}")
    total = {n: 0.0 for n in contenders}
    with torch.no_grad():
        for queries, width in SHAPES:
            for tokens in (4, 16):
                d = width // HEADS
                q = torch.randn(BATCH, HEADS, queries, d)
                k, v = torch.randn(BATCH, HEADS, TEXT_TOKENS, d), torch.randn(BATCH, HEADS, TEXT_TOKENS, d)
                prompts = [ImageKV(torch.randn(BATCH, HEADS, tokens, d), torch.randn(BATCH, HEADS, tokens, d), SCALE)]
                gap = (separate(q, k, v, prompts) - in_place(q, k, v, prompts)).abs().max().item()
                assert gap < 1e-5, f"the two decoupled versions differ by {gap}"
                times = {n: [] for n in contenders}
                for _ in range(args.repeats):
                    for name, fn in contenders.items():
                        start = time.perf_counter()
                        fn(q, k, v, prompts)
                        times[name].append(time.perf_counter() - start)
                ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
                for n in contenders:
                    total[n] += ms[n]
                extra_separate, extra_in_place = ms["separate"] - ms["plain"], ms["in place"] - ms["plain"]
                print(f"{queries:7d} {width:5d} {tokens:6d} " + " ".join(f"{ms[n]:10.3f}" for n in contenders)
                      + f" {extra_separate:16.3f} {extra_in_place:16.3f} {1 - extra_in_place / extra_separate:6.0%}")
    extra_separate, extra_in_place = total["separate"] - total["plain"], total["in place"] - total["plain"]
    print(f"all shapes: extra over plain {extra_separate:.2f} ms separate, {extra_in_place:.2f} ms in place "
          f"({1 - extra_in_place / extra_separate:.0%} less); milliseconds are medians of {args.repeats}, "
          f"{args.threads} thread(s)")


if __name__ == "__main__":
    main()
