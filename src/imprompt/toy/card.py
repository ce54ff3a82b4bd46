"""The toy models' card (``MODEL_CARD.md``): how the shipped models were made and what they score."""

from __future__ import annotations

import json

from .config import BuildConfig
from .models import SPEC


def model_card(cfg: BuildConfig, stages: dict) -> str:
    """The card from the build's settings and what each stage recorded (``stages``: stage -> done.json),
    plus ``NOTES.md`` of the work folder if there is one (restarts and changed settings, written by hand)."""
    def get(stage, *keys):
        value = stages.get(stage) or {}
        for k in keys:
            value = value.get(k, {}) if isinstance(value, dict) else {}
        return value if value != {} else "n/a"

    spec = json.dumps(SPEC.to_dict())
    shape_weight = f"; shape pixels x (1 + {cfg.vae_shape_weight:g})" if cfg.vae_shape_weight else ""
    lines = [
        "# imprompt toy models", "",
        "A tiny CLIP, a tiny Stable Diffusion (SD1.5 layout) and a linear IP-Adapter, trained from scratch on the toy",
        "shapes world (`imprompt.toy.shapes`, 32x32 images) by `imprompt toy build` on a 2-core CPU. Standard formats:",
        "`StableDiffusionPipeline.from_pretrained(\"pipeline\")`, `CLIPVisionModelWithProjection` in",
        "`image_encoder/`, the adapter in the official IP-Adapter format (`ip_adapter.safetensors`). The image encoder",
        "sits beside the adapter files, as in the official layout, so `imprompt generate --adapter ip_adapter.safetensors`",
        "finds it without `--image-encoder` (with this pipeline or a model derived from it).",
        "`simple_adapter.safetensors` is the evaluation's ablation (paper 4.4.1). `clip/` is the scoring CLIP of",
        "`imprompt eval`: its config, tokenizer, image processor and the two weights the towers lack; the towers are",
        "`pipeline/text_encoder` and `image_encoder` (`towers.json`; loaded by",
        "`imprompt.toy.models.load_shared_tower_clip`).",
        "`controlnet/` is a toy ControlNet (`ControlNetModel.from_pretrained`) whose control image is the shape's",
        "silhouette (`--control-preprocess toy_silhouette` makes one from any toy picture), fine-tuned with the adapter",
        "in the loop so that its layout holds beside an image prompt of another shape (`imprompt.toy.compose`).",
        "Weights are stored in fp16, the ControlNet's in fp8 e4m3fn (loaders cast them to the dtype asked for;",
        "imprompt loads fp32).", "",
        "## How they were made", "",
        f"Seed {cfg.seed}; train split {cfg.train_size} images. Model sizes: `{spec}`.", "",
        "| stage | steps | batch | train time (s) | notes |", "|---|---|---|---|---|",
        f"| CLIP (contrastive) | {get('clip', 'steps')} | {cfg.clip_batch} | {get('clip', 'train_seconds')} | lr {cfg.clip_lr}, cosine |",
        f"| robust_clip (vision tower distilled onto loosened pictures, text tower kept) | {get('robust_clip', 'steps')} | "
        f"{cfg.robust_clip_batch} clean + {cfg.robust_clip_batch} loosened | {get('robust_clip', 'train_seconds')} | "
        f"lr {cfg.robust_clip_lr}, cosine; the image encoder |",
        f"| VAE (MSE + 0.1 L1 + {cfg.vae_kl} KL{shape_weight}) | {get('vae', 'steps')} | {cfg.vae_batch} | {get('vae', 'train_seconds')} | scaling_factor {get('vae', 'scaling_factor')} |",
        f"| UNet (epsilon, 10% caption dropout, EMA {cfg.ema_decay}) | {get('unet', 'steps')} | {cfg.unet_batch} | {get('unet', 'train_seconds')} | lr {cfg.unet_lr} |",
        f"| IP-Adapter linear (`imprompt.training`) | {get('adapter', 'steps')} | 64 | {get('adapter', 'train_seconds_this_run')} | lr {cfg.adapter_lr}, partial captions; resumed runs count only the last |",
        f"| simple adapter (paper 4.4.1, `--variant shared`) | {get('simple_adapter', 'steps')} | 64 | {get('simple_adapter', 'train_seconds_this_run')} | same data, lr and seed |",
        f"| ControlNet ({get('controlnet', 'variant')}: {get('controlnet', 'parameters')} weights, UNet frozen, "
        f"{cfg.controlnet_caption_dropout:.0%} caption dropout) | {get('controlnet', 'steps')} | {cfg.controlnet_batch} | "
        f"{get('controlnet', 'train_seconds')} | lr {cfg.controlnet_lr}, constant; the shapes' silhouettes as control |",
        f"| ControlNet fine-tuned with the adapter in the loop (`imprompt.toy.compose`; the shipped one) | "
        f"{get('controlnet_compose', 'steps')} | {cfg.controlnet_batch} | {get('controlnet_compose', 'train_seconds')} | "
        f"lr {cfg.controlnet_compose_lr}, constant; control A, image prompt B, target A's layout in B's look |",
        "",
        "The adapters train on `adapter/data/train.jsonl` (`adapter_stages.adapter_data`): the train images with *partial*",
        "captions (`shapes.partial_caption`: each of shape, colour, style and background named with probability",
        f"{cfg.adapter_caption_p}), not the full ones the UNet saw. With captions that name everything, the text leaves the",
        "image prompt nothing to add except on the 5% of steps whose text is dropped (measured: image-only colour 65%",
        "after 4,000 steps on full captions, 72% after 600 on partial ones; 60 test references each).",
        f"Edit samples (one attribute changed, the original as the image prompt) are in the list for {cfg.adapter_edit_p:.0%}",
        "of the images (`BuildConfig.adapter_edit_p`; see the build notes for what they did at 50%).",
        "", "## Scores", "",
        f"- CLIP zero-shot attribute accuracy (test): `{json.dumps(get('clip', 'zero_shot'))}`",
        f"- Image encoder (robust_clip) zero-shot on pictures drawn by `toy.drawn`: `{json.dumps(get('robust_clip', 'robustness'))}` "
        f"(the clip stage's tower: `{json.dumps(get('robust_clip', 'robustness_before'))}`)",
        f"- VAE: attribute reader on test reconstructions: `{json.dumps(get('vae', 'reader_accuracy_on_reconstructions'))}`, "
        f"PSNR {get('vae', 'psnr_db')} dB",
        f"- Text-to-image (caption as prompt): `{json.dumps(get('quality', 'text_to_image'))}`",
        f"- Image prompt alone (empty text, scale 1.0): `{json.dumps(get('quality', 'image_only'))}`",
        f"- Unconditional (no text, no image) vs the same references: `{json.dumps(get('quality', 'unconditional'))}`",
        f"- Image + text (multimodal), by scale: `{json.dumps(get('quality', 'multimodal'))}`",
        f"- ControlNet (`controlnet/`, fp8 e4m3fn weights), empty text / the caption, control scale "
        f"{get('controlnet', 'quality', 'control_scale')}: `{json.dumps(get('controlnet', 'quality', 'alone'))}` / "
        f"`{json.dumps(get('controlnet', 'quality', 'with_caption'))}` before the fine-tuning beside the adapter; after it, "
        f"alone / beside an image prompt of another shape (scale 1, empty text): "
        f"`{json.dumps(get('controlnet_compose', 'quality', 'alone'))}` / "
        f"`{json.dumps(get('controlnet_compose', 'quality', 'with_adapter'))}`; with a text naming the control's shape, "
        f"control scale {get('controlnet_compose', 'quality_named', 'control_scale')}: "
        f"`{json.dumps(get('controlnet_compose', 'quality_named', 'with_adapter_and_text'))}` "
        "(`imprompt toy control`; docs/toy-controlnet.md)",
        "", f"Quality settings: `{json.dumps({k: get('quality', k) for k in ('n', 'steps', 'guidance')})}` "
        "(test split, DPM-Solver++; see `imprompt.toy.quality`). Targets: text-to-image and image-only colour and",
        "background >= 90%, shape >= 80%; multimodal >= 75% each.", "",
        "`references/` holds example reference images (the last two from held-out shape/colour pairs) and their attributes.",
    ]
    notes = cfg.work / "NOTES.md"
    if notes.is_file():
        lines += ["", "## Build notes", "", notes.read_text().strip()]
    return "\n".join(lines) + "\n"
