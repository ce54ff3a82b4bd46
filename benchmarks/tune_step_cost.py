"""The cost of one `imprompt tune` step on the SD1.5 architecture at 512 px, counted on the meta device.

    PYTHONPATH=src python benchmarks/tune_step_cost.py [BATCH] [FORWARD_SECONDS]

A full-size SD1.5 UNet (859.5M parameters) with a base IP-Adapter attached is built on the meta device
(no memory, no arithmetic) and one tuning step's forward and backward run under torch's FLOP counter,
beside one plain forward of the same batch. Tuning differentiates only to the image features: the
backward pass computes no weight gradients, only those of the activations, through every layer above
the first cross-attention, so a step costs about two forwards per draw. FORWARD_SECONDS (default 20,
this CPU's measured SD1.5 forward at 64x64 latents, one sample) turns the ratio into an estimate of
seconds per step here.
"""

from __future__ import annotations

import sys

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from imprompt.adapter.attach import adapter_for_unet, attach
from imprompt.adapter.variants import AdapterVariant
from imprompt.training.recipe import step_generator
from imprompt.training.tune import Conditions, step_loss


def sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def main() -> None:
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    forward_seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    with torch.device("meta"):
        unet = sd15_unet().requires_grad_(False)
        adapter = adapter_for_unet(unet, AdapterVariant("linear", 1024, 768, 4)).requires_grad_(False)
        features = torch.zeros(1, 1024, requires_grad=True)
        cond = Conditions(torch.zeros(1, 4, 64, 64), torch.zeros(1, 77, 768), None,
                          DDPMScheduler(num_train_timesteps=1000))
    with attach(unet, adapter) as attachment:
        with FlopCounterMode(display=False) as step:
            step_loss(attachment, 0, features, cond, step_generator(0, 0, 0), batch).backward()
        with FlopCounterMode(display=False) as forward, torch.no_grad():
            step_loss(attachment, 0, features, cond, step_generator(0, 0, 0), batch)
        # What a step costs when the loaded weights keep requires_grad (as from_pretrained leaves them,
        # and as tune() ran before it froze them): a gradient for every weight too.
        unet.requires_grad_(True)
        with FlopCounterMode(display=False) as unfrozen:
            step_loss(attachment, 0, features, cond, step_generator(0, 0, 0), batch).backward()
    ratio = step.get_total_flops() / forward.get_total_flops()
    print(f"SD1.5 UNet + base IP-Adapter, 512 px (64x64 latents), batch {batch}:")
    print(f"  forward      {forward.get_total_flops() / 1e12:8.2f} TFLOP")
    print(f"  tuning step  {step.get_total_flops() / 1e12:8.2f} TFLOP (forward + backward, {ratio:.2f}x the forward)")
    print(f"  with weight gradients {unfrozen.get_total_flops() / 1e12:8.2f} TFLOP "
          f"({unfrozen.get_total_flops() / step.get_total_flops():.2f}x the frozen step: what freezing saves)")
    minutes = ratio * batch * forward_seconds / 60
    print(f"  estimate here: {ratio:.2f} x {batch} x {forward_seconds:g} s = {minutes:.1f} "
          f"min per step ({forward_seconds:g} s = one measured forward at batch 1)")


if __name__ == "__main__":
    main()
