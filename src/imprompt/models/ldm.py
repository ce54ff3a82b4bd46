"""Diffusers component state dicts in the original single-file ("LDM") checkpoint layout.

The single-file layout is the one the original training code saved and that AUTOMATIC1111, ComfyUI and
diffusers' ``from_single_file`` read. Its key names are the module paths of the original models:

* UNet, ``model.diffusion_model.*``: ``UNetModel`` in CompVis/stable-diffusion
  ``ldm/modules/diffusionmodules/openaimodel.py`` (``time_embed``, ``label_emb``, ``input_blocks``,
  ``middle_block``, ``output_blocks``, ``out``). Each ``input_blocks.N`` / ``output_blocks.N`` is a
  sequence: a ResBlock at ``.0``, a SpatialTransformer at ``.1`` if the level attends, and the
  upsampler at the end (``.1`` or ``.2``); a downsampler is a block of its own (``input_blocks.N.0.op``).
  The SpatialTransformer's own keys (``norm``, ``proj_in``, ``transformer_blocks.K.*``, ``proj_out``)
  are diffusers' names already, ``proj_in`` being a 1x1 conv (SD1.5) or a Linear (SD2/SDXL,
  ``use_linear_in_transformer``) in both layouts alike.
* VAE, ``first_stage_model.*``: ``Encoder`` / ``Decoder`` in ``ldm/modules/diffusionmodules/model.py``
  (``down.I.block.J``, ``mid.block_1``, ``mid.attn_1``, ``up.I`` numbered from the highest resolution,
  so diffusers' ``up_blocks.0`` is ``up.{levels-1}``). The mid-block attention projects with 1x1 convs
  (``q``, ``k``, ``v``, ``proj_out``: shape [C, C, 1, 1]) where diffusers keeps Linear weights [C, C].
* Text encoders. ``FrozenCLIPEmbedder`` (SD1.5; ``ldm/modules/encoders/modules.py``) wraps the HF
  ``CLIPTextModel``, so its keys are transformers' own under ``cond_stage_model.transformer.text_model.``.
  ``FrozenOpenCLIPEmbedder`` (SD2, ``cond_stage_model.model.``) and SDXL's second embedder
  (Stability-AI/generative-models ``sgm/modules/encoders/modules.py``, ``conditioner.embedders.1.model.``)
  hold an open_clip model: ``token_embedding``, ``positional_embedding``,
  ``transformer.resblocks.N.{ln_1, attn.in_proj_weight (q, k, v stacked), attn.out_proj, ln_2,
  mlp.c_fc, mlp.c_proj}``, ``ln_final`` and ``text_projection``, a matrix applied as ``x @ P``, hence
  the transpose of the HF ``text_projection.weight``. SDXL's first embedder is the HF CLIP-L again,
  under ``conditioner.embedders.0.transformer.text_model.``.
* ControlNet, ``control_model.*``: ``ControlNet`` in lllyasviel/ControlNet ``cldm/cldm.py``: the UNet's
  ``time_embed`` / ``input_blocks`` / ``middle_block``, plus ``zero_convs.N.0`` (one per input block),
  ``middle_block_out.0`` and ``input_hint_block``, a 15-entry Sequential of convs and SiLUs whose convs
  sit at the even indices 0, 2, ..., 14.

Every function here is pure: it renames (and where the layout demands it concatenates, transposes or
reshapes) the tensors it is given and checks that each input key lands in exactly one place, raising
``ValueError`` for the first key that has none.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CONTROLNET_PREFIX = "control_model."
BASES = ("sd15", "sd2", "sdxl")

State = Mapping[str, torch.Tensor]

# diffusers ResnetBlock2D -> LDM ResBlock: in_layers = (GroupNorm, SiLU, conv), emb_layers = (SiLU, Linear),
# out_layers = (GroupNorm, SiLU, Dropout, conv); the Sequential indices are part of the key.
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                    "conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attention
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
# The original ControlNet's hint encoder: conv(hint, 16), then (conv c->c, conv c->c' stride 2) for the
# widths 16 -> 32 -> 96 -> 256, then conv(256, model_channels), SiLUs between: 4 widths, convs at 0..14.
HINT_WIDTHS = 4


# --- the rule engine: (diffusers prefix, LDM prefix, kind of sub-module) ------------------------------------

def _same(rest: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    return rest, tensor


def _renamed_head(names: Mapping[str, str]) -> Callable[[str, torch.Tensor], tuple[str, torch.Tensor] | None]:
    def rename(rest: str, tensor: torch.Tensor):
        head, dot, tail = rest.partition(".")
        return (f"{names[head]}.{tail}", tensor) if dot and head in names else None
    return rename


def _vae_attention(rest: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    for old, new in VAE_ATTENTION_NAMES.items():
        if rest.startswith(old):
            name = new + rest[len(old):]
            if old != "group_norm." and name.endswith(".weight"):
                if tensor.ndim != 2:
                    raise ValueError(f"VAE mid-block attention {rest}: expected a Linear weight of 2 dimensions "
                                     f"[C, C], found shape {list(tensor.shape)}")
                tensor = tensor[:, :, None, None]  # Linear [C, C] -> the original's 1x1 conv [C, C, 1, 1]
            return name, tensor
    return None


KINDS = {"same": _same, "resnet": _renamed_head(RESNET_NAMES), "vae_resnet": _renamed_head(VAE_RESNET_NAMES),
         "vae_attention": _vae_attention}


def _put(out: dict, sources: dict, ldm_key: str, tensor: torch.Tensor, key: str, what: str) -> None:
    if ldm_key in out:
        raise ValueError(f"{what}: keys {sources[ldm_key]!r} and {key!r} both map to {ldm_key!r}; expected one "
                         "source per single-file key")
    out[ldm_key] = tensor
    sources[ldm_key] = key


def _apply_rules(state: State, rules: list[tuple[str, str, str]], prefix: str, what: str) -> dict[str, torch.Tensor]:
    """Rename every key of ``state`` by the rule whose diffusers prefix it starts with.

    No rule prefix is a prefix of another (each names one sub-module), so the first dotted prefix of a
    key found in the table is its only rule. A key without a rule, or whose sub-module part the rule's
    kind does not know, is an error; so is a rule no key used, since that means the config describes
    a different model than the state.
    """
    table = {old: (new, kind) for old, new, kind in rules}
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    used = set()
    for key, tensor in state.items():
        parts = key.split(".")
        match = next((p for p in (".".join(parts[:n]) + "." for n in range(1, len(parts))) if p in table), None)
        renamed = None
        if match is not None:
            new, kind = table[match]
            renamed = KINDS[kind](key[len(match):], tensor)
        if renamed is None:
            raise ValueError(f"{what}: key {key!r} has no place in the single-file layout (is the config the one "
                             f"of this model? expected keys under {', '.join(repr(r[0]) for r in rules[:3])}, ...)")
        used.add(match)
        _put(out, sources, prefix + new + renamed[0], renamed[1], key, what)
    unused = [old for old, _, _ in rules if old not in used]
    if unused:
        raise ValueError(f"{what}: the config implies weights under {unused[0]!r}, but the state has no such key "
                         f"({len(unused)} such sub-modules); pass the state and config of the same model")
    return out


def _config(config: Mapping[str, Any], name: str, what: str) -> Any:
    if name not in config:
        raise ValueError(f"{what} config has no {name!r}; pass the model's own config (model.config)")
    return config[name]


def _per_level(value: Any, levels: int, name: str, what: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    if isinstance(value, (list, tuple)) and len(value) == levels and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"{what} config {name}: expected an int or {levels} ints (one per block_out_channels "
                     f"entry), found {value!r}")


def _attends(kind: str, known: Mapping[str, bool], where: str, what: str) -> bool:
    if kind not in known:
        raise ValueError(f"{what} config {where} {kind!r} has no single-file layout here; expected one of "
                         f"{', '.join(known)}")
    return known[kind]


# --- UNet and ControlNet ------------------------------------------------------------------------------------

def _stem_rules(config: Mapping[str, Any], what: str) -> list[tuple[str, str, str]]:
    """Timestep embedding, the input conv and the class / added-condition embedding (``label_emb``)."""
    rules = [("time_embedding.linear_1.", "time_embed.0.", "same"),
             ("time_embedding.linear_2.", "time_embed.2.", "same"), ("conv_in.", "input_blocks.0.0.", "same")]
    addition = config.get("addition_embed_type")
    if addition == "text_time":  # SDXL: label_emb = Sequential(Sequential(Linear, SiLU, Linear))
        rules += [("add_embedding.linear_1.", "label_emb.0.0.", "same"),
                  ("add_embedding.linear_2.", "label_emb.0.2.", "same")]
    elif addition is not None:
        raise ValueError(f"{what} config addition_embed_type {addition!r} has no single-file layout here; expected "
                         "None or 'text_time' (SDXL)")
    class_embed = config.get("class_embed_type")
    if class_embed in ("timestep", "projection"):
        rules += [("class_embedding.linear_1.", "label_emb.0.0.", "same"),
                  ("class_embedding.linear_2.", "label_emb.0.2.", "same")]
    elif class_embed is not None:
        raise ValueError(f"{what} config class_embed_type {class_embed!r} has no single-file layout here; expected "
                         "None, 'timestep' or 'projection'")
    elif config.get("num_class_embeds") is not None:  # the x4 upscaler's nn.Embedding
        rules.append(("class_embedding.", "label_emb.", "same"))
    return rules


def _down_rules(config: Mapping[str, Any], what: str) -> tuple[list[tuple[str, str, str]], int]:
    """The encoder half; returns the rules and the number of ``input_blocks`` (conv_in included)."""
    levels = len(_config(config, "block_out_channels", what))
    types = list(_config(config, "down_block_types", what))
    if len(types) != levels:
        raise ValueError(f"{what} config: expected {levels} down_block_types (one per block_out_channels entry), "
                         f"found {len(types)}")
    layers = _per_level(_config(config, "layers_per_block", what), levels, "layers_per_block", what)
    rules, index = [], 1
    for level, kind in enumerate(types):
        attends = _attends(kind, DOWN_BLOCKS, f"down_block_types[{level}]", what)
        for layer in range(layers[level]):
            rules.append((f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0.", "resnet"))
            if attends:
                rules.append((f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1.", "same"))
            index += 1
        if level < levels - 1:
            rules.append((f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", "same"))
            index += 1
    return rules, index


def _mid_rules(config: Mapping[str, Any], what: str) -> list[tuple[str, str, str]]:
    kind = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if kind is None:
        return []
    if kind != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"{what} config mid_block_type {kind!r} has no single-file layout here; expected "
                         "'UNetMidBlock2DCrossAttn'")
    return [("mid_block.resnets.0.", "middle_block.0.", "resnet"),
            ("mid_block.attentions.0.", "middle_block.1.", "same"),
            ("mid_block.resnets.1.", "middle_block.2.", "resnet")]


def _up_rules(config: Mapping[str, Any], what: str) -> list[tuple[str, str, str]]:
    """The decoder half. Each up level has one ResBlock more than its down level; the upsampler closes
    the level's last output block, after the SpatialTransformer if there is one."""
    levels = len(_config(config, "block_out_channels", what))
    types = list(_config(config, "up_block_types", what))
    if len(types) != levels:
        raise ValueError(f"{what} config: expected {levels} up_block_types (one per block_out_channels entry), "
                         f"found {len(types)}")
    layers = _per_level(_config(config, "layers_per_block", what), levels, "layers_per_block", what)[::-1]
    rules, index = [], 0
    for level, kind in enumerate(types):
        attends = _attends(kind, UP_BLOCKS, f"up_block_types[{level}]", what)
        count = layers[level] + 1
        for layer in range(count):
            rules.append((f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0.", "resnet"))
            if attends:
                rules.append((f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1.", "same"))
            if layer == count - 1 and level < levels - 1:
                after = 2 if attends else 1
                rules.append((f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{index}.{after}.conv.", "same"))
            index += 1
    return rules


def unet_to_ldm(state: State, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel`` state dict as ``model.diffusion_model.*`` (openaimodel.py ``UNetModel``).

    ``config`` is the model's config (``unet.config``): ``block_out_channels``, ``layers_per_block`` (an
    int or one per level), ``down_block_types`` / ``up_block_types`` (CrossAttn or plain blocks),
    ``mid_block_type``, and the ``label_emb`` source (``addition_embed_type='text_time'`` for SDXL,
    ``class_embed_type``, ``num_class_embeds``). Transformer depth and linear ``proj_in`` need no
    config: their keys are the same in both layouts.
    """
    what = "UNet"
    down, _ = _down_rules(config, what)
    out = [("conv_norm_out.", "out.0.", "same"), ("conv_out.", "out.2.", "same")]
    rules = _stem_rules(config, what) + down + _mid_rules(config, what) + _up_rules(config, what) + out
    return _apply_rules(state, rules, UNET_PREFIX, what)


def controlnet_to_ldm(state: State, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A ``ControlNetModel`` state dict as ``control_model.*`` (lllyasviel/ControlNet ``cldm/cldm.py``).

    The UNet encoder half is named as in :func:`unet_to_ldm`; ``controlnet_down_blocks.N`` become
    ``zero_convs.N.0``, ``controlnet_mid_block`` ``middle_block_out.0``, and the conditioning embedding
    ``input_hint_block.{0, 2, ..., 14}``. That Sequential has a fixed shape, so the config's
    ``conditioning_embedding_out_channels`` must have 4 entries (the original's are 16, 32, 96, 256).
    """
    what = "ControlNet"
    widths = list(_config(config, "conditioning_embedding_out_channels", what))
    if len(widths) != HINT_WIDTHS:
        raise ValueError(f"ControlNet config conditioning_embedding_out_channels: expected {HINT_WIDTHS} widths "
                         f"(the original input_hint_block has 16, 32, 96, 256), found {len(widths)} ({widths})")
    down, blocks = _down_rules(config, what)
    zero_convs = [(f"controlnet_down_blocks.{n}.", f"zero_convs.{n}.0.", "same") for n in range(blocks)]
    hint_convs = 2 * (HINT_WIDTHS - 1)  # two convs per width step
    hint = ([("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", "same")]
            + [(f"controlnet_cond_embedding.blocks.{n}.", f"input_hint_block.{2 * (n + 1)}.", "same")
               for n in range(hint_convs)]
            + [("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (hint_convs + 1)}.", "same")])
    rules = (_stem_rules(config, what) + hint + down + zero_convs + _mid_rules(config, what)
             + [("controlnet_mid_block.", "middle_block_out.0.", "same")])
    return _apply_rules(state, rules, CONTROLNET_PREFIX, what)


# --- VAE ----------------------------------------------------------------------------------------------------

def vae_to_ldm(state: State, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An ``AutoencoderKL`` state dict as ``first_stage_model.*`` (ldm ``Encoder`` / ``Decoder``).

    Reads ``block_out_channels``, ``layers_per_block``, the block types (``DownEncoderBlock2D`` /
    ``UpDecoderBlock2D``), ``use_quant_conv``, ``use_post_quant_conv`` and ``mid_block_add_attention``
    from ``config`` (``vae.config``). The mid-block attention's Linear weights become 1x1 convs.
    """
    what = "VAE"
    levels = len(_config(config, "block_out_channels", what))
    layers = _config(config, "layers_per_block", what)
    for name, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(_config(config, name, what))
        if types != [expected] * levels:
            raise ValueError(f"VAE config {name}: expected {levels} x {expected!r}, found {types}")
    rules = []
    for coder in ("encoder", "decoder"):
        rules += [(f"{coder}.conv_in.", f"{coder}.conv_in.", "same"),
                  (f"{coder}.conv_out.", f"{coder}.conv_out.", "same"),
                  (f"{coder}.conv_norm_out.", f"{coder}.norm_out.", "same"),
                  (f"{coder}.mid_block.resnets.0.", f"{coder}.mid.block_1.", "vae_resnet"),
                  (f"{coder}.mid_block.resnets.1.", f"{coder}.mid.block_2.", "vae_resnet")]
        if config.get("mid_block_add_attention", True):
            rules.append((f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1.", "vae_attention"))
    for name in ("quant_conv", "post_quant_conv"):
        if config.get(f"use_{name}", True):
            rules.append((f"{name}.", f"{name}.", "same"))
    for level in range(levels):
        last = level == levels - 1
        rules += [(f"encoder.down_blocks.{level}.resnets.{n}.", f"encoder.down.{level}.block.{n}.", "vae_resnet")
                  for n in range(layers)]
        if not last:
            rules.append((f"encoder.down_blocks.{level}.downsamplers.0.conv.", f"encoder.down.{level}.downsample.conv.",
                          "same"))
        up = levels - 1 - level  # the original numbers decoder levels from the highest resolution
        rules += [(f"decoder.up_blocks.{level}.resnets.{n}.", f"decoder.up.{up}.block.{n}.", "vae_resnet")
                  for n in range(layers + 1)]
        if not last:
            rules.append((f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", "same"))
    return _apply_rules(state, rules, VAE_PREFIX, what)


# --- text encoders ------------------------------------------------------------------------------------------

CLIP_PARTS = ("embeddings.", "encoder.layers.", "final_layer_norm.")
OPEN_CLIP_NAMES = {"embeddings.token_embedding.weight": "token_embedding.weight",
                   "embeddings.position_embedding.weight": "positional_embedding",
                   "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER_NAMES = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                         "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
QKV_KEY = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def _text_key(key: str) -> str:
    # CLIPTextModelWithProjection nests the transformer under text_model.; CLIPTextModel does too before
    # transformers 5.6 and is flat after it. Both spellings are the same weights.
    return key.removeprefix("text_model.")


def clip_to_ldm(state: State, prefix: str) -> dict[str, torch.Tensor]:
    """An HF ``CLIPTextModel`` state dict (OpenAI CLIP-L) under ``prefix``, keeping transformers' names.

    ``prefix`` ends in ``text_model.``: ``cond_stage_model.transformer.text_model.`` (SD1.5) or
    ``conditioner.embedders.0.transformer.text_model.`` (SDXL). The layout has no text projection.
    """
    what = f"CLIP text encoder ({prefix})"
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in state.items():
        name = _text_key(key)
        if not name.startswith(CLIP_PARTS):
            raise ValueError(f"{what}: key {key!r} has no place in the single-file layout; expected keys under "
                             f"{', '.join(CLIP_PARTS)} (a CLIPTextModel, which has no text projection)")
        _put(out, sources, prefix + name, tensor, key, what)
    return out


def open_clip_to_ldm(state: State, prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP text state dict in open_clip's layout under ``prefix`` (``cond_stage_model.model.`` for
    SD2, ``conditioner.embedders.1.model.`` for SDXL).

    Per layer, q/k/v are stacked (in that order) into ``attn.in_proj_weight`` / ``in_proj_bias``, as
    ``torch.nn.MultiheadAttention`` holds them; ``text_projection.weight`` (Linear, [proj, width]) becomes
    ``text_projection`` ([width, proj]). The ``position_ids`` buffer older transformers saved has no
    open_clip counterpart; it is dropped after checking that it is the plain ``arange`` it always is.
    """
    what = f"OpenCLIP text encoder ({prefix})"
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    stacks: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = _text_key(key)
        layer = LAYER_KEY.fullmatch(name)
        qkv = QKV_KEY.fullmatch(layer.group(2)) if layer else None
        if name == "embeddings.position_ids":
            expected = torch.arange(tensor.shape[-1]).expand_as(tensor)
            if tensor.device.type != "meta" and not torch.equal(tensor.long().cpu(), expected):
                raise ValueError(f"{what}: {key!r} is not 0, 1, 2, ...; expected the default position ids")
        elif name in OPEN_CLIP_NAMES:
            _put(out, sources, prefix + OPEN_CLIP_NAMES[name], tensor, key, what)
        elif name == "text_projection.weight":
            _put(out, sources, prefix + "text_projection", tensor.T.contiguous(), key, what)
        elif qkv:
            stacked = f"{prefix}transformer.resblocks.{layer.group(1)}.attn.in_proj_{qkv.group(2)}"
            if qkv.group(1) in stacks.setdefault(stacked, {}):
                raise ValueError(f"{what}: {key!r} appears twice (with and without 'text_model.')")
            stacks[stacked][qkv.group(1)] = tensor
        else:
            sub = layer and next((s for s in OPEN_CLIP_LAYER_NAMES if layer.group(2).startswith(s)), None)
            if not sub:
                raise ValueError(f"{what}: key {key!r} has no place in the open_clip layout; expected embeddings.*, "
                                 "encoder.layers.N.{self_attn, layer_norm1, layer_norm2, mlp}.*, final_layer_norm.* "
                                 "or text_projection.weight")
            ldm_key = (f"{prefix}transformer.resblocks.{layer.group(1)}."
                       f"{OPEN_CLIP_LAYER_NAMES[sub]}{layer.group(2)[len(sub):]}")
            _put(out, sources, ldm_key, tensor, key, what)
    for stacked, parts in stacks.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"{what}: {stacked} needs q, k and v projections; {', '.join(missing)} missing "
                             f"(found {', '.join(parts)})")
        out[stacked] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# (base, encoder index) -> converter and prefix: which layout each text encoder takes in a single file.
TEXT_LAYOUTS = {("sd15", 0): (clip_to_ldm, "cond_stage_model.transformer.text_model."),
                ("sd2", 0): (open_clip_to_ldm, "cond_stage_model.model."),
                ("sdxl", 0): (clip_to_ldm, "conditioner.embedders.0.transformer.text_model."),
                ("sdxl", 1): (open_clip_to_ldm, "conditioner.embedders.1.model.")}


def text_encoder_to_ldm(state: State, base: str, index: int = 0) -> dict[str, torch.Tensor]:
    """Text encoder ``index`` (0, or 1 for SDXL's ``text_encoder_2``) of a ``base`` model in its single-file layout."""
    if (base, index) not in TEXT_LAYOUTS:
        raise ValueError(f"no text encoder {index} for base {base!r}; expected one of "
                         f"{', '.join(f'{b}/{i}' for b, i in TEXT_LAYOUTS)}")
    convert, prefix = TEXT_LAYOUTS[(base, index)]
    return convert(state, prefix)


# --- whole pipelines ----------------------------------------------------------------------------------------

def detect_base(pipe: Any) -> str:
    """``"sdxl"`` for a pipeline with a ``text_encoder_2``; otherwise the text encoder's activation tells
    OpenAI's CLIP-L (``quick_gelu``: SD1.x) from OpenCLIP ViT-H (``gelu``: SD2.x)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    encoder = getattr(pipe, "text_encoder", None)
    act = getattr(getattr(encoder, "config", None), "hidden_act", None)
    if act == "quick_gelu":
        return "sd15"
    if act == "gelu":
        return "sd2"
    raise ValueError(f"cannot tell SD1.5 from SD2 by the text encoder's hidden_act: expected 'quick_gelu' (CLIP-L, "
                     f"SD1.5) or 'gelu' (OpenCLIP, SD2), found {act!r}; pass base='sd15' or base='sd2'")


def pipeline_to_ldm(pipe: Any, base: str | None = None) -> dict[str, torch.Tensor]:
    """A whole single file (UNet, VAE, text encoders) from a ``StableDiffusionPipeline`` or
    ``StableDiffusionXLPipeline``; ``base`` in ``BASES``, by default :func:`detect_base`.

    Components a single file does not carry (scheduler, tokenizers, safety checker, image encoder)
    are ignored. An SD2 file gets the layers diffusers keeps: diffusers drops the last of OpenCLIP's 24
    (SD2 reads the penultimate layer) and its text projection, so the file lacks them too.
    """
    base = base or detect_base(pipe)
    if base not in BASES:
        raise ValueError(f"base {base!r}: expected one of {', '.join(BASES)}")
    encoders = [getattr(pipe, "text_encoder", None)]
    second = getattr(pipe, "text_encoder_2", None)
    if base == "sdxl":
        encoders.append(second)
    elif second is not None:
        raise ValueError(f"base {base!r} has one text encoder, but the pipeline has a text_encoder_2; expected "
                         "base='sdxl'")
    for index, encoder in enumerate(encoders):
        if encoder is None:
            name = "text_encoder_2" if index else "text_encoder"
            raise ValueError(f"the pipeline's {name} is None; a {base} single file needs it (an SDXL refiner, which "
                             "has none, is not supported)")
    parts = [unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config), vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config)]
    parts += [text_encoder_to_ldm(encoder.state_dict(), base, index) for index, encoder in enumerate(encoders)]
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        clash = next((key for key in part if key in state), None)
        if clash is not None:
            raise ValueError(f"two components both produce {clash!r}")
        state.update(part)
    return state
