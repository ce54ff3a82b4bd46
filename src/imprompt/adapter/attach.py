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
from .embeds_scaling import scale_image_kv
from .layers import LayerScales
from .weight_types import LayerWeight
from .lora import LayerLoRA
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
    """Raise unless the adapter fits these cross-attention layers: one line, one clause per mismatch,
    each naming what the adapter has and what the UNet has, then the fix."""
    variant = adapter.variant
    want_dim = variant.cross_attention_dim
    found_dim = layers[0].attn.to_k.in_features if layers else None
    by_index = {layer.index: layer for layer in layers}
    ours = adapter.layer_ids
    missing = [i for i in by_index if i not in set(ours)]  # UNet layers without weights
    extra = [i for i in ours if i not in by_index]  # weights for positions this UNet does not have

    def known(dim) -> bool:  # a released model family, not just a width
        return unet_family(dim) != f"cross_attention_dim {dim}"

    def note(dim) -> str:
        return f" ({unet_family(dim)})" if known(dim) else ""

    problems, wrong = [], []
    if not layers:
        problems.append("this UNet has no cross-attention layers")
    elif found_dim != want_dim:
        problems.append(f"its image tokens have width {want_dim}{note(want_dim)}, but this UNet's cross-attention "
                        f"reads width {found_dim}{note(found_dim)}")
    if layers and len(ours) != len(layers):
        problems.append(f"it has weights for {len(ours)} cross-attention layers, but this UNet has {len(layers)}")
    if found_dim == want_dim:  # positions and widths only mean something within one model family
        if extra:
            problems.append(f"its ip_adapter.{extra[0]} is not a cross-attention position of this UNet (those are "
                            f"{', '.join(map(str, by_index))})")
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            problems.append(f"it lacks ip_adapter.{missing[0]} ({by_index[missing[0]].block}){more}")
        widths = [(i, adapter.layer(i).to_k_ip.out_features, by_index[i].attn.to_k.out_features)
                  for i in sorted(set(ours) & set(by_index))]
        wrong = [(i, width, found) for i, width, found in widths if width != found]
        if wrong:
            index, width, found = wrong[0]
            problems.append(f"ip_adapter.{index} has width {width}, but this UNet's {by_index[index].block} "
                            f"has width {found}")
    if not problems:
        return
    if layers and found_dim != want_dim:
        fix = (f"Use an adapter made for {family}, or an {unet_family(want_dim)} model."
               if known(want_dim) and known(found_dim) else
               f"Use an adapter made for this model (cross_attention_dim {found_dim}), or a model with "
               f"cross_attention_dim {want_dim}.")
    elif missing and not extra and not wrong:
        fix = "The file has lost layers (cut short or edited): re-download it."
    else:
        fix = "It was made for a differently built UNet: use an adapter made for this model."
    where = f"this {family} UNet" if layers and known(found_dim) else "this UNet"
    raise CheckpointError(f"the {variant.name} adapter does not fit {where}: {'; '.join(problems)}. {fix}")


def check_lora_fits(adapter: IPAdapter, unet, family: str) -> None:
    """A FaceID adapter's LoRA must cover every attention layer of the UNet, with matching widths."""
    if not adapter.lora_ids:
        return
    names = list(unet.attn_processors)
    modules = dict(unet.named_modules())
    if adapter.lora_ids != list(range(len(names))):
        raise CheckpointError(
            f"the {adapter.variant.name} adapter has LoRA weights for {len(adapter.lora_ids)} attention layers, but "
            f"this {family} UNet has {len(names)}: it was made for a differently built UNet; use an adapter made for this model")
    for index, name in enumerate(names):
        attn, layer = modules[name.removesuffix(".processor")], adapter.layer(index)
        for target, linear in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            pair = getattr(layer, f"{target}_lora")
            if (pair.down.in_features, pair.up.out_features) != (linear.in_features, linear.out_features):
                raise CheckpointError(
                    f"ip_adapter.{index}.{target}_lora maps width {pair.down.in_features} to {pair.up.out_features}, but "
                    f"this UNet's {name.removesuffix('.processor')}.{target} maps {linear.in_features} to "
                    f"{linear.out_features}: use an adapter made for this model")


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
            check_lora_fits(adapter, unet, self.family)
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
                 masks: Mapping[int, torch.Tensor] | None = None,
                 weights: Mapping[str, LayerWeight] | None = None, swapped_tokens: torch.Tensor | None = None,
                 embeds_scaling: str = "V only") -> dict[str, ImageKV]:
        """Per-layer keys and values of one image prompt, computed once for a whole generation.

        ``image_tokens`` is (rows, tokens, dim), one row per distinct batch entry (e.g. unconditional
        then conditional); each row is repeated ``batch_repeat`` times to match the UNet's batch.
        ``weights`` (a weight type's, :func:`imprompt.adapter.weight_types.layer_weights`) replaces
        ``scale`` layer by layer; where one says ``swap``, ``swapped_tokens`` (same rows) are used
        instead. ``embeds_scaling`` says where the weight acts (:mod:`imprompt.adapter.embeds_scaling`).
        Layers whose weight is zero are left out entirely.
        """
        if not self.attached:
            raise RuntimeError("the adapters were detached from this UNet")
        adapter = self.adapters[adapter_index]
        self.check_layer_scales(layer_scales)
        out: dict[str, ImageKV] = {}
        for layer in self.layers:
            base = scale
            tokens = image_tokens
            if weights is not None:
                if layer.block not in weights:
                    raise ValueError(f"the layer weights have no entry for {layer.block}; compute them for this UNet")
                base = weights[layer.block].weight
                if weights[layer.block].swap:
                    if swapped_tokens is None:
                        raise ValueError(f"{layer.block} swaps its image tokens, but no swapped_tokens were given")
                    tokens = swapped_tokens
            weight = base * layer_scales.weight(layer.block)
            if weight == 0:
                continue
            key, value = adapter.layer(layer.index)(tokens)
            key, value, out_scale = scale_image_kv(key, value, weight, embeds_scaling)
            heads = layer.attn.heads
            key, value = (
                t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2).repeat_interleave(batch_repeat, dim=0)
                for t in (key, value)
            )
            out[layer.block] = ImageKV(key, value, out_scale, window, dict(masks) if masks is not None else None)
        return out

    def layer_loras(self, adapter_index: int, scale: float = 1.0) -> dict[str, LayerLoRA]:
        """A FaceID adapter's LoRA for one call, by attention layer (self-attention layers included);
        empty for adapters without LoRA. ``scale`` is the official ``lora_scale`` (1 by default)."""
        if not self.attached:
            raise RuntimeError("the adapters were detached from this UNet")
        adapter = self.adapters[adapter_index]
        names = [name.removesuffix(".processor") for name in self.unet.attn_processors]
        return {names[i]: LayerLoRA.of(adapter.layer(i), scale, adapter_index) for i in adapter.lora_ids}

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

    def prompt_call(self, prompts: Sequence[Mapping[str, ImageKV | LayerLoRA]], num_steps: int = 1) -> ImagePromptCall:
        """The per-call state that makes these prepared image prompts act in one UNet call (or a
        whole generation): pass ``call.cross_attention_kwargs()`` to the UNet or pipeline.
        FaceID LoRAs (:func:`imprompt.adapter.faceid.layer_loras`) may come among them: each
        adapter's once, however many of its image prompts the call has."""
        if not self.attached:
            raise RuntimeError("the adapters were detached from this UNet")
        layers: dict[str, list[ImageKV]] = {}
        loras: dict[str, list[LayerLoRA]] = {}
        for prompt in prompts:
            for name, item in prompt.items():
                if isinstance(item, LayerLoRA):
                    if all(other.owner != item.owner for other in loras.get(name, ())):
                        loras.setdefault(name, []).append(item)
                else:
                    layers.setdefault(name, []).append(item)
        return ImagePromptCall(layers, num_steps=num_steps, loras=loras)


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
