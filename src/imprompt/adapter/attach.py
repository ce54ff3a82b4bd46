"""Attaching adapters to a diffusers ``UNet2DConditionModel`` and detaching them without a trace.

The official checkpoints address layers by position: ``ip_adapter.N`` is the N-th entry of
``unet.attn_processors`` (registration order: down blocks, up blocks, mid block last; attn1 and attn2
alternating inside each transformer block), and only the attn2 (cross-attention) entries carry
adapter weights. :func:`cross_attention_layers` is the one place where positions become names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .attention import DecoupledAttnProcessor, ImageKV, ImagePromptCall, StepWindow
from .layers import LayerScales
from .model import IPAdapter
from .variants import CheckpointError, unet_family


@dataclass(frozen=True)
class CrossAttentionLayer:
    index: int  # position among all attention processors = the official ``ip_adapter.N``
    name: str  # the processor's key, e.g. 'up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor'
    attn: torch.nn.Module  # diffusers ``Attention``

    @property
    def block(self) -> str:
        return self.name.removesuffix(".processor")


def cross_attention_layers(unet) -> list[CrossAttentionLayer]:
    modules = dict(unet.named_modules())
    return [
        CrossAttentionLayer(i, name, modules[name.removesuffix(".processor")])
        for i, name in enumerate(unet.attn_processors)
        if not name.endswith("attn1.processor")
    ]


def unet_family_of(unet) -> str:
    """The model family for messages, from the cross-attention width (SD1.5: 768, SDXL: 2048)."""
    dim = unet.config.cross_attention_dim
    return unet_family(dim if isinstance(dim, int) else dim[0])


def unet_layout(unet) -> str:
    """Which block layout layer presets use: SDXL's (text_time conditioning) or SD1.5's.

    Read from the architecture, not the width, so that small models of either shape (tests, the
    toy world) get the presets too.
    """
    return "SDXL" if unet.config.addition_embed_type == "text_time" else "SD1.5"


def check_compatible(adapter: IPAdapter, layers: Sequence[CrossAttentionLayer], family: str) -> None:
    """Raise, naming expected and found, unless the adapter fits these cross-attention layers."""
    variant = adapter.variant
    found_dim = layers[0].attn.to_k.in_features if layers else None
    if found_dim != variant.cross_attention_dim or len(layers) != len(adapter.layer_ids):
        raise CheckpointError(
            f"this {variant.name} adapter was made for a UNet with cross_attention_dim "
            f"{variant.cross_attention_dim} and {len(adapter.layer_ids)} cross-attention layers; this {family} "
            f"UNet has cross_attention_dim {found_dim} and {len(layers)}. Use an adapter made for "
            f"{family}, or a {unet_family(variant.cross_attention_dim)} model"
        )
    ids = [layer.index for layer in layers]
    if ids != adapter.layer_ids:
        raise CheckpointError(
            f"adapter layer indices {adapter.layer_ids[:4]}... do not match this UNet's cross-attention "
            f"positions {ids[:4]}...; the checkpoint was made for a differently built UNet"
        )
    for layer in layers:
        width = adapter.layer(layer.index).to_k_ip.out_features
        if width != layer.attn.to_k.out_features:
            raise CheckpointError(
                f"ip_adapter.{layer.index} has width {width}, but {layer.block} has {layer.attn.to_k.out_features}"
            )


def install_processors(unet, owner: int) -> dict[str, DecoupledAttnProcessor]:
    """Wrap every attention processor of ``unet`` (once, shared by all attachments), by block name.

    Self-attention layers are wrapped too: diffusers hands ``cross_attention_kwargs`` to every
    attention layer, and an unwrapped processor would warn at each call about the image prompts it
    cannot take. The wrappers pass such calls straight to the original processor.
    """
    processors = unet.attn_processors
    ours = [isinstance(p, DecoupledAttnProcessor) for p in processors.values()]
    if any(ours) and not all(ours):
        raise RuntimeError(
            "some of this UNet's attention processors were replaced while imprompt adapters were attached; "
            "detach every attachment before calling set_attn_processor"
        )
    if not all(ours):
        processors = {name: DecoupledAttnProcessor(p, name.removesuffix(".processor")) for name, p in processors.items()}
        unet.set_attn_processor(dict(processors))
    for processor in processors.values():
        processor.attachments.add(owner)
    return {name.removesuffix(".processor"): p for name, p in processors.items()}


def release_processors(unet, processors: Mapping[str, DecoupledAttnProcessor], owner: int) -> None:
    """Drop ``owner``'s claim; the last one out puts the very same original processors back."""
    for processor in processors.values():
        processor.attachments.discard(owner)
    if all(not p.attachments for p in processors.values()):
        modules = dict(unet.named_modules())
        for name, processor in processors.items():
            modules[name].set_processor(processor.original)


class Attachment:
    """One or more adapters attached to a UNet. Use as a context manager, or call :meth:`detach`.

    Attaching wraps the UNet's attention processors in :class:`DecoupledAttnProcessor` (once per
    UNet: several attachments share the wrappers); detaching the last attachment puts the very same
    original processor objects back. The UNet's parameters are never touched, and the wrappers hold
    nothing per call: a call acts with image prompts only when it brings them
    (:meth:`prompt_call`), so other callers of the same UNet see the plain UNet and several
    attachments (different adapters, different requests) can be used side by side.
    """

    def __init__(self, unet, adapters: Sequence[IPAdapter]):
        if not adapters:
            raise ValueError("attach needs at least one adapter")
        layers = cross_attention_layers(unet)
        if getattr(unet, "encoder_hid_proj", None) is not None:
            raise RuntimeError(
                "this UNet has diffusers' own IP-Adapter (or another image projection) loaded; call "
                "pipe.unload_ip_adapter() before attaching imprompt adapters"
            )
        self.family = unet_family_of(unet)
        self.layout = unet_layout(unet)
        for adapter in adapters:
            check_compatible(adapter, layers, self.family)
        self.unet = unet
        self.layers = layers
        param = next(unet.parameters())
        self.adapters = [a.to(device=param.device, dtype=param.dtype) for a in adapters]
        self._processors = install_processors(unet, id(self))

    @property
    def attached(self) -> bool:
        return bool(self._processors)

    def detach(self) -> None:
        if self._processors:
            release_processors(self.unet, self._processors, id(self))
            self._processors = {}

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def layer_kv(self, adapter_index: int, image_tokens: torch.Tensor, *, scale: float,
                 layer_scales: LayerScales, window: StepWindow = StepWindow(), batch_repeat: int = 1,
                 masks: Mapping[int, torch.Tensor] | None = None) -> dict[str, ImageKV]:
        """Per-layer keys and values of one image prompt, computed once for a whole generation.

        ``image_tokens`` is (rows, tokens, dim), one row per distinct batch entry (e.g. unconditional
        then conditional); each row is repeated ``batch_repeat`` times to match the UNet's batch.
        Layers whose weight is zero are left out entirely.
        """
        if not self.attached:
            raise RuntimeError("the adapters were detached from this UNet")
        adapter = self.adapters[adapter_index]
        self.check_layer_scales(layer_scales)
        out: dict[str, ImageKV] = {}
        for layer in self.layers:
            weight = scale * layer_scales.weight(layer.block)
            if weight == 0:
                continue
            key, value = adapter.layer(layer.index)(image_tokens)
            heads = layer.attn.heads
            key, value = (
                t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2).repeat_interleave(batch_repeat, dim=0)
                for t in (key, value)
            )
            out[layer.block] = ImageKV(key, value, weight, window, dict(masks) if masks is not None else None)
        return out

    def check_layer_scales(self, layer_scales: LayerScales) -> None:
        """Every named block must exist here: a typo would otherwise silently switch layers off."""
        blocks = [layer.block for layer in self.layers]
        for prefix in layer_scales.blocks:
            if not any(b == prefix or b.startswith(prefix + ".") for b in blocks):
                names = sorted({b.split(".transformer_blocks")[0] for b in blocks})
                raise ValueError(
                    f"layer weights name {prefix!r}, which is not a cross-attention block of this {self.family} "
                    f"UNet; its blocks are: {', '.join(names)}"
                )

    def prompt_call(self, prompts: Sequence[Mapping[str, ImageKV]], num_steps: int = 1) -> ImagePromptCall:
        """The per-call state that makes these prepared image prompts act in one UNet call (or a
        whole generation): pass ``call.cross_attention_kwargs()`` to the UNet or pipeline."""
        if not self.attached:
            raise RuntimeError("the adapters were detached from this UNet")
        layers: dict[str, list[ImageKV]] = {}
        for prompt in prompts:
            for name, kv in prompt.items():
                layers.setdefault(name, []).append(kv)
        return ImagePromptCall(layers, num_steps=num_steps)


def attach(unet, adapters: IPAdapter | Sequence[IPAdapter]) -> Attachment:
    """Attach one adapter or several to ``unet``; returns the handle that detaches them."""
    return Attachment(unet, [adapters] if isinstance(adapters, IPAdapter) else list(adapters))


def adapter_for_unet(unet, variant, *, copy_text_kv: bool = True) -> IPAdapter:
    """A new adapter shaped for ``unet``; ``to_k_ip`` / ``to_v_ip`` start as copies of each layer's
    ``to_k`` / ``to_v`` (the training recipe of the official scripts), or random if not copied."""
    layers = cross_attention_layers(unet)
    dim = layers[0].attn.to_k.in_features
    if dim != variant.cross_attention_dim:
        raise CheckpointError(f"variant has cross_attention_dim {variant.cross_attention_dim}, the UNet {dim}")
    adapter = IPAdapter(variant, {layer.index: layer.attn.to_k.out_features for layer in layers})
    if copy_text_kv:
        with torch.no_grad():
            for layer in layers:
                kv = adapter.layer(layer.index)
                kv.to_k_ip.weight.copy_(layer.attn.to_k.weight)
                kv.to_v_ip.weight.copy_(layer.attn.to_v.weight)
    return adapter
