"""Reference-only: a reference image steers a generation through the UNet's own features, no adapter.

What sd-webui-controlnet's ``reference_only`` / ``reference_adain`` / ``reference_adain+attn`` do
(``scripts/hook.py``, Lvmin Zhang's "attention auto machine"; diffusers' community pipelines
``stable_diffusion_reference.py`` / ``stable_diffusion_xl_reference.py`` do the same on diffusers UNets):

1. The reference is encoded by the VAE once. Before every UNet call of the generation, the reference
   latent is noised to the call's timestep (``sqrt(a_t) x0 + sqrt(1 - a_t) eps``, ``t`` rounded as the
   extension's ``q_sample`` does) and run through the UNet with the same text, batch and timestep: the
   *write* pass. It records, per selected self-attention (attn1) layer, the layer's input hidden states
   (``reference_only``), and per selected block, the per-channel mean and variance of its output over
   the spatial positions (``reference_adain``; the extension calls these "gn" though they are channel,
   not group, statistics).
2. In the *read* pass (the real UNet call), a selected attn1 layer attends over ``[own hidden states,
   reference hidden states]`` (keys and values from both, queries from its own), and a selected block's
   output is renormalised to the reference's statistics (AdaIN, :func:`adain`).

**Style fidelity** (the extension's ``threshold_a``) decides what the *unconditional* half of a
classifier-free-guidance batch sees; the conditional half always sees the reference. With ``f`` the
style fidelity, for the unconditional rows::

    out_uncond = f * plain + (1 - f) * with_reference

(hook.py: ``style_cfg * attn_c + (1 - style_cfg) * attn_uc`` where ``attn_c`` is plain on the
unconditional rows and ``attn_uc`` is the reference attention on every row). So at ``f = 0`` both
halves see the reference and guidance does not amplify it ("my prompt is more important"); at
``f = 1`` only the conditional half does and guidance amplifies it ("ControlNet is more important").
Style fidelity 0 is therefore *not* "no reference". What does equal no reference, bit for bit, is
weight 0 (no layer and no block selected: the write pass does not even run), a step outside
``start``/``end``, or no reference at all; and without guidance (one half only) the style fidelity has
no effect (tests/test_reference.py checks each).

**Weight** (the unit's weight; the community pipelines' ``attention_auto_machine_weight`` and
``gn_auto_machine_weight``) selects layers as the extension does: the attn1 layers sorted by width,
widest first (stable, in the original UNet's down/mid/up order), layer ``i`` of ``n`` acts when
``weight > i / n``; the AdaIN blocks carry the extension's fixed table of weights (:func:`adain_points`)
and act when ``weight > block weight`` (weight 1 selects the low-resolution half, 2 all of them).

Where it plugs in: the attention part runs inside :class:`~imprompt.adapter.attention.DecoupledAttnProcessor`,
with this call's :class:`ReferenceCall` travelling in the call's
:class:`~imprompt.adapter.attention.ImagePromptCall` (``cross_attention_kwargs``), so it combines with
IP-Adapter image prompts (they act in both passes, as they do in the extension, where the IP-Adapter
patches the model the write pass also runs through). The write pass is started by a forward pre-hook
on the UNet, and the AdaIN statistics are read and written by forward hooks on the blocks; blocks get
no ``cross_attention_kwargs``, so those hooks are registered **for the call and removed after it**
(:func:`reference_applied`), as LoRAs are (:func:`imprompt.generation.loras.loras_applied`), and each
hook acts only for its own call. The write pass runs without ControlNet residuals (the extension adds
ControlNet only to the real pass).

Not done: several reference units at once (the extension averages their statistics and concatenates
their banks); the extension's inpainting and hires-fix special cases beyond the 9-channel UNet input.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from PIL import Image

from ..adapter.attach import install_processors, release_processors
from ..adapter.attention import IMAGE_PROMPTS_KWARG, StepWindow

REFERENCE_MODES = ("reference_only", "reference_adain", "reference_adain+attn")
ADAIN_EPS = 1e-6  # hook.py's floor on the variances
# UNet keywords the write pass leaves out: ControlNet / T2I-Adapter residuals belong to the real pass only.
_CONTROL_KWARGS = ("down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals")


@dataclass
class ReferenceOptions:
    """One reference image for a generation (an A1111 ControlNet unit with module ``reference_*``)."""

    image: Image.Image
    mode: str = "reference_only"
    style_fidelity: float = 0.5  # the extension's threshold_a
    weight: float = 1.0  # attention_auto_machine_weight (and the AdaIN weight unless adain_weight is given)
    adain_weight: float | None = None  # gn_auto_machine_weight; None: weight
    start: float = 0.0  # guidance start / end, fractions of the schedule
    end: float = 1.0
    noise_seed: int = 0  # the reference's own noise, the same for every image of a batch

    def check(self) -> None:
        if self.mode not in REFERENCE_MODES:
            raise ValueError(f"reference mode must be one of {', '.join(REFERENCE_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.style_fidelity <= 1.0:
            raise ValueError(f"style fidelity must be between 0 and 1, got {self.style_fidelity:g}")
        for name, value in (("weight", self.weight), ("adain weight", self.adain_weight)):
            if value is not None and not 0.0 <= value <= 2.0:
                raise ValueError(f"reference {name} must be between 0 and 2, got {value:g}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"reference start/end must satisfy 0 <= start < end <= 1, got {self.start:g}/{self.end:g}")

    @property
    def attention(self) -> bool:
        return self.mode in ("reference_only", "reference_adain+attn")

    @property
    def adain(self) -> bool:
        return self.mode in ("reference_adain", "reference_adain+attn")

    def describe(self) -> str:
        """PNG-info text, in the extension's ``Key: value`` style."""
        return (f"Module: {self.mode}, Weight: {self.weight:g}, Style Fidelity: {self.style_fidelity:g}, "
                f"Guidance Start: {self.start:g}, Guidance End: {self.end:g}")


# --- the math, as pure functions ------------------------------------------------------------------

def noised_reference(latent: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                     timestep: torch.Tensor | float) -> torch.Tensor:
    """``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (DDPM's q_sample), with ``t`` rounded to the training step.

    This is the UNet's input for every diffusers scheduler: sigma schedulers scale their
    ``x0 + sigma eps`` by ``1 / sqrt(sigma^2 + 1)``, which is the same thing. ``timestep``: a scalar or
    one per row; returns float32.
    """
    t = torch.as_tensor(timestep).detach().float().cpu().round().long().clamp(0, len(alphas_cumprod) - 1)
    a = alphas_cumprod[t].float().to(latent.device)
    if a.ndim:
        a = a.view(-1, 1, 1, 1)
    return a.sqrt() * latent.float() + (1 - a).sqrt() * noise.float()


def adain(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """``(x - mean(x)) / std(x) * std_ref + mean_ref`` per sample and channel over the spatial positions
    (hook.py's ``hacked_group_norm_forward``; variances floored at ``eps``, population variance)."""
    own_var, own_mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    std = own_var.clamp_min(eps).sqrt()
    return (x - own_mean) / std * var.clamp_min(eps).sqrt() + mean


def blend_unconditional(with_reference: torch.Tensor, plain_uncond: torch.Tensor, style_fidelity: float
                        ) -> torch.Tensor:
    """The first ``len(plain_uncond)`` rows become ``f * plain + (1 - f) * with_reference``; the rest
    (the conditional half) keep the reference."""
    rows = plain_uncond.shape[0]
    mixed = style_fidelity * plain_uncond + (1.0 - style_fidelity) * with_reference[:rows]
    return torch.cat([mixed.to(with_reference.dtype), with_reference[rows:]])


def attention_layer_order(unet) -> list[str]:
    """The attn1 layers (block paths) in the extension's order: widest first, then down, mid, up."""
    modules = dict(unet.named_modules())
    names = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn1.processor")]
    section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    return sorted(names, key=lambda n: (-modules[n].to_q.in_features, section.get(n.split(".")[0], 3), names.index(n)))


def selected_attention_layers(order: list[str], weight: float) -> list[str]:
    """hook.py: layer ``i`` of ``n`` (in :func:`attention_layer_order`) writes when ``weight > i / n``."""
    return [name for i, name in enumerate(order) if weight > i / len(order)]


def adain_points(unet) -> list[tuple[str, torch.nn.Module, float]]:
    """The blocks whose outputs AdaIN renormalises, with the extension's weights: ``(name, module, weight)``.

    The extension hooks the LDM UNet's middle block (weight 0), the input blocks after the first
    downsampling (weights ``2 * (1 - w / n)``, highest resolution first) and the output blocks of every
    resolution level but the last (``2 * w / n``), and for SD1.5 / SD2 not output block 8 (its table is
    ``[4, 5, 7, 8, 10, 11]`` / ``[0..7]``; SDXL's ``[4, 5, 7, 8]`` / ``[0..5]``). An LDM block is a resnet
    plus its transformer, plus the upsampler for the last block of a level; in diffusers that is the
    attention's output (the resnet's where there is none), or the upsampler's.
    """
    def layer(block, j: int, k: int, kind: str) -> tuple[str, torch.nn.Module]:
        if kind == "up_blocks" and k == len(block.resnets) - 1 and getattr(block, "upsamplers", None):
            return f"{kind}.{j}.upsamplers.0", block.upsamplers[0]
        if getattr(block, "attentions", None):
            return f"{kind}.{j}.attentions.{k}", block.attentions[k]
        return f"{kind}.{j}.resnets.{k}", block.resnets[k]

    down = [layer(b, j, k, "down_blocks") for j, b in enumerate(unet.down_blocks[1:], 1) for k in range(len(b.resnets))]
    up = [layer(b, j, k, "up_blocks") for j, b in enumerate(unet.up_blocks[:-1]) for k in range(len(b.resnets))]
    if len(unet.down_blocks) == 4:  # SD1.5 / SD2: the extension's table stops at output block 7
        up = up[:-1]
    points = [("mid_block", unet.mid_block, 0.0)] if unet.mid_block is not None else []
    points += [(name, module, 2 * (1 - w / len(down))) for w, (name, module) in enumerate(down)]
    points += [(name, module, 2 * w / len(up)) for w, (name, module) in enumerate(up)]
    return points


# --- the per-call state ---------------------------------------------------------------------------

@dataclass(eq=False)
class ReferenceCall:
    """One generation's reference: its latent, selection and banks. Travels with the call in
    :attr:`ImagePromptCall.reference`; the hooks of :func:`reference_applied` act only for it."""

    options: ReferenceOptions
    latent: torch.Tensor  # (1, C, h, w), VAE-scaled
    alphas_cumprod: torch.Tensor
    guidance: bool  # the UNet batch is [unconditional, conditional] halves
    attention_layers: frozenset[str]
    adain_blocks: dict[str, torch.nn.Module]
    generator: torch.Generator = field(default_factory=torch.Generator)
    mode: str = "off"  # "write" during the reference pass, "read" during the real pass
    banks: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def _uncond_rows(self, batch: int) -> int:
        return batch // 2 if self.guidance and self.options.style_fidelity > 0 else 0

    def self_attention(self, layer: str, original, attn, hidden_states, attention_mask=None, temb=None,
                       *args, **kwargs):
        """attn1 of ``layer`` (called by DecoupledAttnProcessor): record in the write pass, attend over
        the reference in the read pass, else the original processor untouched."""
        if self.mode == "write" and layer in self.attention_layers:
            self.banks[layer] = hidden_states.detach()
        bank = self.banks.get(layer) if self.mode == "read" else None
        if bank is None:
            return original(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)
        if bank.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"{layer}: reference recorded for a batch of {bank.shape[0]}, the UNet runs "
                             f"{hidden_states.shape[0]}")
        # The attention mask (None in the SD pipelines) fits the own tokens only, so it is left out, as
        # the extension and the community pipelines leave it out.
        out = original(attn, hidden_states, torch.cat([hidden_states, bank], dim=1), None, temb, *args, **kwargs)
        rows = self._uncond_rows(hidden_states.shape[0])
        if rows:
            plain = original(attn, hidden_states[:rows], None, attention_mask, temb, *args, **kwargs)
            out = blend_unconditional(out, plain, self.options.style_fidelity)
        return out

    def block_output(self, name: str, output):
        """Forward hook body of an AdaIN block: record its statistics, or renormalise it."""
        if self.mode not in ("write", "read"):
            return None
        x = output[0] if isinstance(output, tuple) else output
        if self.mode == "write":
            var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
            self.stats[name] = (mean, var)
            return None
        if name not in self.stats:
            return None
        y = adain(x.float(), *self.stats[name])
        rows = self._uncond_rows(x.shape[0])
        if rows:
            y = blend_unconditional(y, x[:rows].float(), self.options.style_fidelity)
        y = y.to(x.dtype)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    def _clear(self) -> None:
        self.banks.clear()
        self.stats.clear()

    def _ours(self, kwargs) -> Any:
        call = (kwargs.get("cross_attention_kwargs") or {}).get(IMAGE_PROMPTS_KWARG)
        return call if call is not None and getattr(call, "reference", None) is self else None

    def before_unet(self, unet, args, kwargs):
        """UNet forward pre-hook: run the write pass for this UNet call (at each step)."""
        call = self._ours(kwargs)
        if call is None or self.mode == "write":  # another call's, or our own write pass
            return None
        self._clear()
        window = StepWindow(self.options.start, self.options.end)
        if not (self.attention_layers or self.adain_blocks) or not window.acts(call.step, call.num_steps):
            self.mode = "off"
            return None
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        passed = {k: v for k, v in kwargs.items() if k not in _CONTROL_KWARGS and k not in ("sample", "timestep")}
        passed["return_dict"] = False
        self.mode = "write"
        try:
            with torch.no_grad():
                unet(self.model_input(sample, timestep), timestep, *args[2:], **passed)
        except BaseException:
            self.mode = "off"
            self._clear()
            raise
        self.mode = "read"
        return None

    def after_unet(self, unet, args, kwargs, output):
        if self._ours(kwargs) is not None and self.mode == "read":
            self.mode = "off"
            self._clear()
        return None

    def model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The noised reference, as many rows as ``sample``; for a 9-channel inpainting UNet with an empty
        mask and the reference as the masked image, as the extension's inpaint hijack does."""
        noise = torch.randn(self.latent.shape, generator=self.generator, dtype=torch.float32)
        x = noised_reference(self.latent, noise.to(self.latent.device), self.alphas_cumprod, timestep)
        x = x.expand(sample.shape[0], -1, -1, -1)
        channels = self.latent.shape[1]
        if sample.shape[1] == 2 * channels + 1:
            x = torch.cat([x, torch.zeros_like(x[:, :1]), self.latent.float().expand_as(x)], dim=1)
        elif sample.shape[1] != channels:
            raise ValueError(f"the UNet takes {sample.shape[1]} input channels; reference-only handles "
                             f"{channels} (plain) or {2 * channels + 1} (inpainting)")
        return x.to(device=sample.device, dtype=sample.dtype)


def reference_latent(pipe, image: Image.Image, latent_size: tuple[int, int]) -> torch.Tensor:
    """The reference, cropped and resized to the generation's size (the extension's default "Crop and
    Resize"), encoded by the VAE: the distribution's mean, so no random draw is taken from the
    generation's generators."""
    height, width = (s * pipe.vae_scale_factor for s in latent_size)
    pixels = pipe.image_processor.preprocess(image.convert("RGB"), height=height, width=width, resize_mode="crop")
    vae = pipe.vae
    # An fp16 VAE that asks for upcasting (SDXL's) overflows when encoding; the SDXL pipelines upcast it
    # in place too, and put it back.
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = vae.dtype
    try:
        if upcast:
            vae.to(torch.float32)
        with torch.no_grad():
            latent = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    finally:
        if upcast:
            vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent.float() - shift) * vae.config.scaling_factor).to(pipe.unet.device)


def alphas_cumprod_of(scheduler) -> torch.Tensor:
    found = getattr(scheduler, "alphas_cumprod", None)
    if found is None:  # a scheduler that keeps only sigmas: the training schedule from its config
        from diffusers import DDPMScheduler

        found = DDPMScheduler.from_config(scheduler.config).alphas_cumprod
    return torch.as_tensor(found).float().cpu()


def prepare_reference(pipe, options: ReferenceOptions, guidance: bool, latent_size: tuple[int, int]) -> ReferenceCall:
    """Everything a generation's UNet calls need from the reference, computed once."""
    options.check()
    unet = pipe.unet
    layers = selected_attention_layers(attention_layer_order(unet), options.weight) if options.attention else []
    gn_weight = options.weight if options.adain_weight is None else options.adain_weight
    blocks = {name: module for name, module, w in adain_points(unet) if gn_weight > w} if options.adain else {}
    return ReferenceCall(options, reference_latent(pipe, options.image, latent_size), alphas_cumprod_of(pipe.scheduler),
                         guidance, frozenset(layers), blocks, torch.Generator("cpu").manual_seed(options.noise_seed))


@contextmanager
def reference_applied(unet, call: ReferenceCall | None) -> Iterator[None]:
    """Install what ``call`` needs on ``unet`` for the length of the block, and remove it after.

    The attention processors are wrapped (shared with attached adapters, the originals put back by the
    last one out); the UNet pre/post hooks and the AdaIN block hooks are registered here and removed
    when the block ends, whatever happens. Every hook acts only for ``call``, but, as with LoRAs, no
    other generation should use the same UNet meanwhile.
    """
    if call is None:
        yield
        return
    processors = install_processors(unet, id(call))
    handles = []
    try:
        handles.append(unet.register_forward_pre_hook(call.before_unet, with_kwargs=True))
        handles.append(unet.register_forward_hook(call.after_unet, with_kwargs=True))
        for name, module in call.adain_blocks.items():
            handles.append(module.register_forward_hook(
                lambda _module, _args, output, name=name: call.block_output(name, output)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        release_processors(unet, processors, id(call))
        call.mode = "off"
        call._clear()
