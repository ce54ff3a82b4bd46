"""Opt-in step skipping: T-GATE (cross-attention gating) and DeepCache (deep-feature reuse).

Both trade a little fidelity for speed, and both are off unless asked for (``--accelerate tgate:STEP``,
``--accelerate deepcache:N``; Python: ``generate(..., acceleration="tgate:10")``). Without one, nothing
in this module runs and generation is bit-identical to a plain call.

**T-GATE** (Liu et al. 2024, "Cross-Attention Makes Inference Cumbersome in Text-to-Image Diffusion
Models", arXiv 2404.02747). The output of the cross-attention layers converges within the first few
denoising steps; after that it hardly changes. So steps ``0 .. STEP-1`` run as usual, the output of
every cross-attention layer at step ``STEP-1`` is kept, and from step ``STEP`` on the layers are not
computed at all: the kept output is used. What is kept is the *whole* output of our decoupled
cross-attention (text and image prompt parts, after ``to_out``), averaged over the two halves of the
classifier-free-guidance batch (:func:`cfg_average`), as T-GATE does. Since the text (and the image
prompts) reach the SD UNet only through cross-attention, both halves of the batch are then the same
input, guidance has nothing left to amplify, and the unconditional half is dropped (the batch halves:
most of T-GATE's speed comes from here). That is exact for SD1.5-shaped UNets (up to float rounding); for SDXL, whose pooled text
embedding and size conditioning also enter the time embedding, the two halves still differ a little
there, and keeping the conditional half is an approximation. The batch is not halved (guidance stays, correct but slower) with a ControlNet (its control
image is doubled outside the step callback's reach) or when a pipeline's tensors are not laid out
as two halves.

**DeepCache** (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free", arXiv
2312.00858). Adjacent steps have very similar high-level features. Every ``N`` steps (step 0, N,
2N, ...) the whole UNet runs and the input of its last (shallowest) up block is kept; in the other
steps only the shallow branch runs: ``conv_in``, the first down block (whose skip connections feed
the last up block), the last up block on the kept deep features, and the output layers. The branch
is cut at block level (the paper's default cuts inside the first block, which saves a little more);
block level reuses diffusers' own blocks unchanged. ControlNet residuals of the shallow skips are
still added. The paper reports 2.3x on SD1.5 at a small quality cost.

Why not the ``tgate`` / ``DeepCache`` packages: both replace the pipeline (their own loaders and
``__call__``) and ``tgate`` installs its own attention processors, which would remove ours, so the
image prompts would be lost; both also keep their caches on the shared pipeline or UNet, while our
server runs generations side by side. Here the ideas plug into what we already have:

* T-GATE's cache lives in a :class:`CrossAttentionGate` that travels with the call in the call's
  :class:`~imprompt.adapter.attention.ImagePromptCall` (``cross_attention_kwargs``), read by our
  :class:`~imprompt.adapter.attention.DecoupledAttnProcessor`; the gate learns the step from the
  call's own step callback, which also halves the batch (diffusers' documented way to change
  guidance mid-call: ``pipeline._guidance_scale`` and the callback's tensors).
* DeepCache's cache lives in a :class:`DeepCacheUNet`, a wrapper around the shared UNet that only
  this call's pipeline view (:func:`imprompt.generation.generate.call_pipeline`) sees. Its full steps
  call the UNet as it is, with a forward pre-hook on the last up block registered for that one UNet
  call and removed after it; the hook records only for the call whose context set
  :data:`_FEATURE_OWNER`, so another generation on the same UNet meanwhile is not affected.

Not combined (each raises a ValueError saying so): the two methods together, Reference-only (its
extra UNet pass would run through the caches), prompt editing with T-GATE (text changes after the
gate would be ignored), DeepCache with CPU offload (the shallow pass calls UNet blocks directly).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

ACCELERATIONS = {
    "tgate": "T-GATE: compute cross-attention for the first STEP steps, then reuse it and drop guidance",
    "deepcache": "DeepCache: run the whole UNet every N steps, only its shallow blocks in between",
}


@dataclass(frozen=True)
class Acceleration:
    """One step-skipping method and its number: the gate step (tgate) or the interval (deepcache)."""

    method: str
    value: int

    @classmethod
    def parse(cls, text: "str | Acceleration | None") -> "Acceleration | None":
        """``"tgate:10"`` / ``"deepcache:3"`` (None or "" / "none": no acceleration)."""
        if text is None or isinstance(text, Acceleration):
            return text
        raw = text.strip().lower()
        if raw in ("", "none", "off"):
            return None
        method, sep, number = raw.partition(":")
        if method not in ACCELERATIONS:
            raise ValueError(f"--accelerate {text!r}: unknown method {method!r}; expected "
                             f"{' or '.join(f'{m}:N' for m in ACCELERATIONS)} (e.g. tgate:10, deepcache:3)")
        try:
            value = int(number)
        except ValueError:
            raise ValueError(f"--accelerate {text!r}: expected {method}:N with a whole number N "
                             f"(e.g. {method}:{10 if method == 'tgate' else 3}), found {number!r}") from None
        accel = cls(method, value)
        accel.check()
        return accel

    def check(self, steps: int | None = None) -> None:
        if self.method not in ACCELERATIONS:
            raise ValueError(f"unknown acceleration {self.method!r}; expected one of {', '.join(ACCELERATIONS)}")
        if self.method == "tgate" and self.value < 1:
            raise ValueError(f"tgate:{self.value}: the gate step must be at least 1 (the cross-attention of "
                             "the steps before it is what is reused)")
        if self.method == "deepcache" and self.value < 2:
            raise ValueError(f"deepcache:{self.value}: the interval must be at least 2 (1 would run the whole "
                             "UNet at every step, i.e. no acceleration)")
        if steps is not None and self.method == "tgate" and self.value >= steps:
            raise ValueError(f"tgate:{self.value} gates at step {self.value} but the generation has {steps} steps; "
                             f"give a gate step below {steps} (T-GATE suggests about 40% of the steps)")

    def describe(self) -> str:
        return f"{self.method}:{self.value}"


def cfg_average(output: torch.Tensor) -> torch.Tensor:
    """The mean of the unconditional and conditional halves of a guidance batch ``[uncond; cond]``.

    T-GATE (arXiv 2404.02747): after the gate step the cross-attention output cached for
    both branches is their average, which makes the branches equal and classifier-free guidance moot.
    """
    uncond, cond = output.chunk(2)
    return (uncond + cond) / 2


@dataclass
class CrossAttentionGate:
    """T-GATE's per-call state: the step, and each cross-attention layer's kept output."""

    gate_step: int
    guidance: bool  # the UNet batch is [uncond; cond]
    step: int = 0
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    halved: bool = False

    def cross_attention(self, layer: str, hidden_states: torch.Tensor, compute: Callable[[], torch.Tensor]
                        ) -> torch.Tensor:
        """Called by the attention processor for every cross-attention layer instead of computing it."""
        if self.step < self.gate_step:
            out = compute()
            if self.step == self.gate_step - 1:
                self.outputs[layer] = cfg_average(out) if self.guidance else out
            return out
        kept = self.outputs.get(layer)
        if kept is None:
            raise RuntimeError(f"T-GATE: layer {layer} was not computed before the gate step {self.gate_step}")
        repeat = hidden_states.shape[0] // kept.shape[0]
        # Guidance kept (no halving possible): the averaged output serves both halves.
        return kept if repeat == 1 else kept.repeat(repeat, *([1] * (kept.ndim - 1)))


def halvable(pipeline, tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor the step callback got is a [uncond; cond] batch twice the latents'."""
    batch = tensors["latents"].shape[0]
    return (getattr(pipeline, "controlnet", None) is None and len(tensors) > 1
            and all(isinstance(t, torch.Tensor) and t.shape[0] == 2 * batch
                    for name, t in tensors.items() if name != "latents"))


# The DeepCacheUNet whose full pass is running in this context (thread / task): the feature hook
# records only for it, so other generations on the same UNet are left alone.
_FEATURE_OWNER: contextvars.ContextVar = contextvars.ContextVar("imprompt_deepcache_owner", default=None)


class DeepCacheUNet:
    """This call's view of the shared UNet: the whole UNet every ``interval`` steps, else the shallow branch.

    Looks like the UNet to the pipeline (every attribute is the UNet's); holds only this call's
    cache. Not an ``nn.Module``, so it adds nothing to any state dict.
    """

    def __init__(self, unet, interval: int):
        self._unet = unet
        self.interval = interval
        self.step = 0
        self.features: torch.Tensor | None = None
        self.full_passes = 0
        self.shallow_passes = 0
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        shallow_skips = 1 + len(first.resnets) + (1 if getattr(first, "downsamplers", None) else 0)
        if len(last.resnets) > shallow_skips:
            raise ValueError(f"DeepCache: the UNet's last up block takes {len(last.resnets)} skip connections but "
                             f"conv_in and the first down block give {shallow_skips}; this UNet layout is not supported")

    def __getattr__(self, name: str) -> Any:
        if name == "_unet":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self._unet, name)

    def __call__(self, sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        if args:
            raise ValueError("DeepCache: call the UNet with keyword arguments after encoder_hidden_states")
        if self.features is None or self.step % self.interval == 0 or self.features.shape[0] != sample.shape[0]:
            return self._full(sample, timestep, encoder_hidden_states, **kwargs)
        return self._shallow(sample, timestep, encoder_hidden_states, **kwargs)

    def _record(self, _module, _args, kwargs):
        if _FEATURE_OWNER.get() is self:
            self.features = kwargs["hidden_states"]

    def _full(self, sample, timestep, encoder_hidden_states, **kwargs):
        handle = self._unet.up_blocks[-1].register_forward_pre_hook(self._record, with_kwargs=True)
        token = _FEATURE_OWNER.set(self)
        try:
            out = self._unet(sample, timestep, encoder_hidden_states, **kwargs)
        finally:
            _FEATURE_OWNER.reset(token)
            handle.remove()
        self.full_passes += 1
        return out

    def _shallow(self, sample, timestep, encoder_hidden_states, class_labels=None, timestep_cond=None,
                 attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None,
                 down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
        # The parts of UNet2DConditionModel.forward (diffusers 0.42) before the first down block and
        # after the last up block, in its order; the blocks in between are replaced by the kept features.
        unet = self._unet
        if down_intrablock_additional_residuals is not None:
            raise ValueError("DeepCache does not support T2I-Adapter residuals")
        if unet.config.addition_embed_type == "image_hint":
            raise ValueError("DeepCache does not support image_hint UNets")
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        sample = unet.conv_in(sample)
        attention = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                         cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask)
        first, last = unet.down_blocks[0], unet.up_blocks[-1]
        if getattr(first, "has_cross_attention", False):
            _, res = first(hidden_states=sample, temb=emb, **attention)
        else:
            _, res = first(hidden_states=sample, temb=emb)
        # The last up block reads the first skips (conv_in's output, then the first block's).
        skips = ((sample,) + tuple(res))[:len(last.resnets)]
        if down_block_additional_residuals is not None:  # ControlNet: its residuals of those skips
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=self.features, temb=emb, res_hidden_states_tuple=skips, upsample_size=None,
                       **attention)
        else:
            out = last(hidden_states=self.features, temb=emb, res_hidden_states_tuple=skips, upsample_size=None)
        if unet.conv_norm_out:
            out = unet.conv_act(unet.conv_norm_out(out))
        out = unet.conv_out(out)
        self.shallow_passes += 1
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)


@dataclass
class AcceleratedCall:
    """One generation's acceleration: made by :func:`start`, advanced by the call's step callback."""

    options: Acceleration
    gate: CrossAttentionGate | None = None
    deep: DeepCacheUNet | None = None

    def on_step_end(self, pipeline, step: int, tensors: dict) -> dict:
        """Advance to step ``step + 1``; at the gate, halve the guidance batch where that is exact."""
        if self.deep is not None:
            self.deep.step = step + 1
        if self.gate is None:
            return tensors
        self.gate.step = step + 1
        if self.gate.step == self.gate.gate_step and self.gate.guidance and halvable(pipeline, tensors):
            # diffusers re-reads do_classifier_free_guidance (guidance_scale > 1) at every step.
            pipeline._guidance_scale = 1.0
            tensors = {name: t if name == "latents" else t.chunk(2)[1] for name, t in tensors.items()}
            self.gate.halved = True
        return tensors


def halving_inputs(pipeline) -> list[str]:
    """The step-callback tensors that carry the guidance batch (and so halve with it)."""
    names = getattr(pipeline, "_callback_tensor_inputs", [])
    return ["latents", *[n for n in names if n != "latents" and not n.startswith("negative_")]]


def start(options: Acceleration, view, *, guidance: bool, steps: int, edits: bool, reference: bool
          ) -> tuple[AcceleratedCall, dict[str, Any]]:
    """This call's acceleration on the pipeline ``view`` (its own, from ``call_pipeline``), and the
    extra pipeline arguments it needs (step-callback tensors)."""
    options.check(steps)
    if reference:
        raise ValueError(f"--accelerate {options.describe()} does not combine with Reference-only (its extra "
                         "UNet pass would run through the caches); leave one of them out")
    if options.method == "tgate":
        if edits:
            raise ValueError(f"--accelerate {options.describe()}: the prompt changes during the steps (prompt "
                             "editing / alternation), but T-GATE stops reading the text at the gate; leave one out")
        extra = {"callback_on_step_end_tensor_inputs": halving_inputs(view)} if guidance else {}
        return AcceleratedCall(options, gate=CrossAttentionGate(options.value, guidance)), extra
    if getattr(view.unet, "_hf_hook", None) is not None:
        raise ValueError(f"--accelerate {options.describe()} does not work with CPU offload (the shallow steps "
                         "call the UNet's blocks directly); leave out --cpu-offload")
    deep = DeepCacheUNet(view.unet, options.value)
    # Only this call's pipeline view sees the wrapper; object.__setattr__ skips the pipeline's
    # config bookkeeping of a new component (the view is thrown away after the call).
    object.__setattr__(view, "unet", deep)
    return AcceleratedCall(options, deep=deep), {}


@contextmanager
def gate_applied(unet, call: AcceleratedCall | None) -> Iterator[None]:
    """Our attention processors on ``unet`` for the call (T-GATE reads the cross-attention through
    them, also with no adapter attached), released after it, as Reference-only does."""
    if call is None or call.gate is None:
        yield
        return
    from ..adapter.attach import install_processors, release_processors

    processors = install_processors(unet, id(call))
    try:
        yield
    finally:
        release_processors(unet, processors, id(call))
