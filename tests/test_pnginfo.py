from imprompt.generation.pnginfo import format_parameters, parse_parameters, read_png_parameters, save_png
from PIL import Image


def test_round_trip_with_quoting():
    settings = {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": 42, "Size": "512x768",
                "IP-Adapter 0": 'Model: ip-adapter_sd15, Weight: 0.6, Images: a "b".png', "Skipped": None}
    text = format_parameters("a cat,\nsitting", "ugly, blurry", settings)
    assert 'IP-Adapter 0: "Model: ip-adapter_sd15, Weight: 0.6, Images: a \\"b\\".png"' in text
    assert "Skipped" not in text
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "a cat,\nsitting"
    assert parsed["Negative prompt"] == "ugly, blurry"
    assert parsed["IP-Adapter 0"] == settings["IP-Adapter 0"]
    assert parsed["Seed"] == "42" and parsed["Sampler"] == "DPM++ 2M Karras"


def test_reads_what_automatic1111_writes():
    text = ("masterpiece, a knight\nNegative prompt: lowres\nSteps: 25, Sampler: Euler a, Schedule type: Automatic, "
            "CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
            'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15 [6a3f6166], Weight: 0.6", Version: v1.10.1')
    parsed = parse_parameters(text)
    assert parsed["Prompt"] == "masterpiece, a knight"
    assert parsed["Sampler"] == "Euler a"
    assert parsed["ControlNet 0"].startswith("Module: ip-adapter_clip_sd15, Model: ip-adapter_sd15")
    assert parsed["Version"] == "v1.10.1"


def test_prompt_only_text_has_no_settings():
    assert parse_parameters("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_png_chunk_written_atomically(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "x.png", "p\nSteps: 1, Seed: 2, Size: 4x4")
    assert read_png_parameters(path) == "p\nSteps: 1, Seed: 2, Size: 4x4"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
