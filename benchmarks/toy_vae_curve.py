"""The toy VAE's learning curve: the attribute reader on test reconstructions every K steps.

Trains the toy build's VAE (same model, loss, batches and warm-up + cosine schedule as the ``vae``
stage, from scratch) with a given learning rate, steps and batch, and prints one JSON line per
evaluation: PSNR and the reader's per-attribute accuracy on the first 400 test images, reconstructed.
Needs a toy build work folder whose ``data`` stage is done (``imprompt toy build --stage data``).
Issue 15 (toy build in 60 minutes) asked how few VAE steps suffice; docs/benchmarks.md has the runs.

With SHAPE_WEIGHT k > 0 each pixel's squared and absolute error is weighted by 1 + k x the shape's
solid coverage there, normalised by the mean weight (``imprompt.toy.stages.reconstruction_loss``, the
build's ``--vae-shape-weight``): the shape's pixels are a small share of a 32x32 image, and its colour
is what the VAE learned last.

    .venv/bin/python benchmarks/toy_vae_curve.py WORK LR STEPS BATCH EVERY [THREADS] [SHAPE_WEIGHT]
"""
import sys, time, json, math
import numpy as np, torch, torch.nn.functional as F
torch.set_flush_denormal(True); torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 1)
from imprompt.toy import models, shapes, workdir
from imprompt.toy.models import SPEC
from imprompt.toy.stages import reconstruction_loss
from imprompt.toy.loop import seeded, step_batch, learning_rate, set_learning_rate
from imprompt.toy.judge import accuracy, read_many
from pathlib import Path
work = Path(sys.argv[1])
lr, steps, batch, every = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pixels = models.vae_pixels(workdir.load_images(work, "train"))
shape_weight = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0
coverage = torch.from_numpy(np.stack([shapes.alpha(a.shape, a.size, a.position, "solid")
                                      for _, _, a in workdir.load_metadata(work, "train")])).float()[:, None]
weights = 1.0 + shape_weight * coverage  # (N, 1, 32, 32)
test = workdir.load_images(work, "test")[:400]
truth = [a for _, _, a in workdir.load_metadata(work, "test")][:400]
vae = seeded(0, lambda: models.vae(SPEC.vae)).train()
opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
t0 = time.perf_counter()
for i in range(steps):
    set_learning_rate(opt, learning_rate(i, steps, 50, lr, cosine=True))
    idx = step_batch(len(pixels), batch, 0, i)
    x, w = pixels[idx], weights[idx]
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mode()).sample
    loss = reconstruction_loss(rec, x, w if shape_weight else None) + 1e-6 * post.kl().mean()
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    if (i + 1) % every == 0 or i + 1 == steps:
        vae.eval()
        with torch.no_grad():
            r = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in models.vae_pixels(test).split(200)])
        vae.train()
        img = models.to_uint8(r)
        mse = float(np.mean((img.astype(np.float64) - test) ** 2))
        acc = accuracy(read_many(list(img)), truth)
        print(json.dumps({"lr": lr, "batch": batch, "shape_weight": shape_weight, "step": i + 1, "s": round(time.perf_counter() - t0), "loss": round(loss.item(), 4),
                          "psnr": round(10 * math.log10(255 ** 2 / mse), 2), **{k: round(v, 3) for k, v in acc.items()}}), flush=True)
