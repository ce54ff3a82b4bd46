"""imprompt serve's HTTP APIs on the bundled toy model: A1111's /sdapi/v1 with ControlNet-extension units,
the native /v1, and what the server refuses. Pixels are compared with `imprompt generate`'s."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from imprompt import toy
from imprompt.cli import main
from imprompt.generation.embeds import embeds_from_bytes, load_embeds
from imprompt.generation.pnginfo import parse_parameters
from imprompt.server.app import create_app
from imprompt.server.config import ServerConfig
from server_util import running

torch.set_flush_denormal(True)
REFS = sorted(toy.toy_paths()["references"].glob("*.png"))


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def pixels_of(b64png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB"))


def unit(ref: Path, weight: float = 0.7, **more) -> dict:
    return {"enabled": True, "module": "ip-adapter-auto", "model": "ip_adapter [0123456789]", "weight": weight,
            "image": b64(ref), **more}


def txt2img(client, *units, **fields) -> httpx.Response:
    body = {"prompt": "a red circle", "steps": 4, "seed": 3, "cfg_scale": 7, **fields,
            "alwayson_scripts": {"controlnet": {"args": list(units)}}}
    return client.post("/sdapi/v1/txt2img", json=body)


@pytest.fixture(scope="module")
def app():
    app = create_app(ServerConfig(ui=False))
    yield app
    app.state.engine.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as client:
        yield client


def cli_pixels(tmp_path, *args) -> np.ndarray:
    out = tmp_path / f"cli{len(list(tmp_path.iterdir()))}"
    assert main(["generate", "--prompt", "a red circle", "--steps", "4", "--seed", "3", "--guidance", "7",
                 "--output", str(out), *args]) == 0
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png).convert("RGB"))


def test_txt2img_units_match_imprompt_generate(client, tmp_path):
    paths = toy.toy_paths()
    one = txt2img(client, unit(REFS[0]))
    assert one.status_code == 200, one.text
    info = json.loads(one.json()["info"])
    assert info["all_seeds"] == [3] and "IP-Adapter 0" in info["infotexts"][0]
    cli = cli_pixels(tmp_path, "--adapter", str(paths["adapter"]), "--image", str(REFS[0]), "--scale", "0.7")
    np.testing.assert_array_equal(pixels_of(one.json()["images"][0]), cli)

    # Two units are two adapters; guidance_start / guidance_end are --start / --end.
    two = txt2img(client, unit(REFS[0]), unit(REFS[1], 0.4, guidance_start=0.25, guidance_end=0.75))
    assert two.status_code == 200, two.text
    cli_two = cli_pixels(tmp_path, "--adapter", str(paths["adapter"]), "--adapter", str(paths["adapter"]),
                         "--image", str(REFS[0]), "--image", f"1={REFS[1]}", "--scale", "0.7", "--scale", "1=0.4",
                         "--start", "1=0.25", "--end", "1=0.75")
    np.testing.assert_array_equal(pixels_of(two.json()["images"][0]), cli_two)
    assert not np.array_equal(cli_two, cli)

    # Disabled units and unknown fields are ignored, as A1111 ignores them.
    same = txt2img(client, unit(REFS[0]), unit(REFS[1], enabled=False), restore_faces=True, styles=["x"])
    np.testing.assert_array_equal(pixels_of(same.json()["images"][0]), cli)


def test_native_api_and_png_info_round_trip(client):
    body = {"prompt": "a red circle", "steps": 4, "seed": 3, "guidance": 7,
            "image_prompts": [{"adapter": "ip_adapter", "images": [b64(REFS[0])], "scale": 0.7}]}
    native = client.post("/v1/generate", json=body)
    assert native.status_code == 200, native.text
    a1111 = txt2img(client, unit(REFS[0]))
    np.testing.assert_array_equal(pixels_of(native.json()["images"][0]["png"]), pixels_of(a1111.json()["images"][0]))

    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + a1111.json()["images"][0]})
    assert info.status_code == 200, info.text
    assert info.json()["parameters"]["Seed"] == "3" and info.json()["parameters"]["Prompt"] == "a red circle"
    assert info.json()["info"] == json.loads(a1111.json()["info"])["infotexts"][0]

    # Jobs: queued, streamed, fetched.
    job = client.post("/v1/jobs", json={**body, "seed": 5}).json()
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as events:
        states = [json.loads(line[6:])["state"] for line in events.iter_lines() if line.startswith("data: ")]
    assert states[-1] == "done" and set(states) <= {"queued", "running", "done"}
    result = client.get(f"/v1/jobs/{job['id']}/result").json()
    assert [i["seed"] for i in result["images"]] == [5]


def test_a_text_diff_through_the_native_api_equals_the_clis(client, tmp_path):
    """The server finds the toy CLIP's text tower as the CLI does, and gives the same pixels."""
    paths = toy.toy_paths()
    spec = {"adapter": "ip_adapter", "images": [b64(REFS[0])], "scale": 1.0,
            "text_diff": "a red circle -> a blue circle", "text_diff_strength": 0.4}
    served = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 4, "seed": 3, "guidance": 7,
                                               "image_prompts": [spec]})
    assert served.status_code == 200, served.text
    assert "Text diff: a red circle -> a blue circle (0.4)" in served.json()["images"][0]["parameters"]
    cli = cli_pixels(tmp_path, "--adapter", str(paths["adapter"]), "--image", str(REFS[0]), "--scale", "1",
                     "--text-diff", "a red circle -> a blue circle", "--text-diff-strength", "0.4")
    np.testing.assert_array_equal(pixels_of(served.json()["images"][0]["png"]), cli)
    plain = cli_pixels(tmp_path, "--adapter", str(paths["adapter"]), "--image", str(REFS[0]), "--scale", "1")
    assert not np.array_equal(plain, cli)


def test_listings_a1111_clients_read(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["model_name"] for m in models] == ["pipeline"]
    assert {"name": "Euler a", "aliases": ["euler_a"], "options": {}} in client.get("/sdapi/v1/samplers").json()
    # the ControlNet extension lists adapters and ControlNets together: the toy's adapter and its ControlNet
    assert client.get("/controlnet/model_list").json() == {"model_list": ["ip_adapter", "controlnet"]}
    assert "ip-adapter_clip_h" in client.get("/controlnet/module_list").json()["module_list"]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "pipeline"
    assert client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
    assert client.get("/openapi.json").json()["paths"]["/v1/jobs"]
    # the toy world's own LoRA and embedding, by the names the prompt takes
    assert [(lora["name"], lora["alias"]) for lora in client.get("/sdapi/v1/loras").json()] == [
        ("toy-striped", "networks/toy-striped")]
    assert client.get("/sdapi/v1/embeddings").json()["loaded"]["tistripes"]["vectors"] == 2


def test_embeddings_of_a_repeated_reference_are_computed_once(app, client):
    cache = app.state.engine.embeddings
    before = cache.computed
    first = txt2img(client, unit(REFS[2]), seed=11)
    after_first = cache.computed
    second = txt2img(client, unit(REFS[2]), seed=12)
    assert after_first == before + 1 and cache.computed == after_first  # the toy adapter reads image_embeds
    assert first.status_code == second.status_code == 200
    assert not np.array_equal(pixels_of(first.json()["images"][0]), pixels_of(second.json()["images"][0]))


def test_bad_input_gets_the_clis_words(client, tmp_path):
    bad = txt2img(client, {**unit(REFS[0]), "image": "not base64!"})
    assert bad.status_code == 422 and "not valid base64" in bad.json()["detail"]
    corrupt = txt2img(client, {**unit(REFS[0]), "image": base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()})
    assert corrupt.status_code == 422 and "cannot read alwayson_scripts.controlnet.args[0].image" in corrupt.json()["detail"]
    typed = client.post("/sdapi/v1/txt2img", json={"steps": "many"})
    assert typed.status_code == 422 and typed.json()["detail"][0]["loc"] == ["body", "steps"]
    sampler = txt2img(client, sampler_name="Nope")
    assert sampler.status_code == 422 and "sampler_name 'Nope'" in sampler.json()["detail"]
    faceid = txt2img(client, {**unit(REFS[0]), "module": "ip-adapter_face_id_plus"})
    assert faceid.status_code == 422 and "FaceID" in faceid.json()["detail"]
    # A region mask of another shape than its reference is refused in the CLI's words.
    wide = io.BytesIO()
    Image.new("L", (64, 16), 255).save(wide, format="PNG")
    mask = txt2img(client, {**unit(REFS[0]), "mask": base64.b64encode(wide.getvalue()).decode()})
    assert mask.status_code == 422, mask.text
    # Names only: never a path, never outside the model folders.
    for name in ("../../../etc/passwd", str(toy.toy_paths()["adapter"]), "/etc/passwd", "ip_adapter/../../x"):
        refused = txt2img(client, {**unit(REFS[0]), "model": name})
        assert refused.status_code == 404, (name, refused.text)
    native = client.post("/v1/generate", json={"model": str(toy.toy_paths()["model"])})
    assert native.status_code == 404


def test_limits_are_checked_before_decoding(tmp_path):
    big = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(big, format="PNG")  # 2 MP, few bytes
    app = create_app(ServerConfig(ui=False, max_upload_mb=0.05, max_upload_megapixels=1))
    with TestClient(app) as client:
        pixels = txt2img(client, {**unit(REFS[0]), "image": base64.b64encode(big.getvalue()).decode()})
        assert pixels.status_code == 413 and "2.0 MP, over the 1 MP limit" in pixels.json()["detail"]
        heavy = txt2img(client, {**unit(REFS[0]), "image": base64.b64encode(np.random.bytes(60_000)).decode()})
        assert heavy.status_code == 413 and "upload limit" in heavy.json()["detail"]
        body = client.post("/sdapi/v1/txt2img", content=b"{" + b" " * 600_000 + b"}",
                           headers={"content-type": "application/json"})
        assert body.status_code == 413
    app.state.engine.close()
    assert not any(tmp_path.iterdir())


def test_auth_and_save_dir(tmp_path):
    app = create_app(ServerConfig(ui=False, api_auth="ann:secret", save_dir=str(tmp_path / "saved")))
    with TestClient(app) as client:
        assert client.get("/sdapi/v1/sd-models").status_code == 401
        assert client.get("/sdapi/v1/sd-models", auth=("ann", "wrong")).status_code == 401
        done = client.post("/sdapi/v1/txt2img", auth=("ann", "secret"), json={"steps": 2, "seed": 1, "n_iter": 2})
        assert done.status_code == 200, done.text
    app.state.engine.close()
    saved = sorted((tmp_path / "saved").glob("*.png"))
    assert [p.name for p in saved] == ["00000-1.png", "00001-2.png"]
    assert parse_parameters(Image.open(saved[1]).info["parameters"])["Seed"] == "2"


def test_concurrent_clients_each_get_their_own_result(app, client):
    """Ten clients at once, A1111, native and the web UI's own path, different references, scales and
    seeds: each result is the one the same request gives alone."""
    from imprompt.server.ui import Form, Session, UnitForm

    clients = 10

    def request(i: int):
        if i >= 8:  # the web page's generate: its form through the UI session, on the same engine
            return "ui", Form(prompt=f"shape {i}", steps=3, guidance=7, seed=100 + i,
                              units=[UnitForm(True, "ip_adapter", [str(REFS[i % 3])], 0.2 + 0.1 * i)])
        if i % 2:
            return "/sdapi/v1/txt2img", {"prompt": f"shape {i}", "steps": 3, "seed": 100 + i, "cfg_scale": 7,
                                         "alwayson_scripts": {"controlnet": {"args": [unit(REFS[i % 3], 0.2 + 0.1 * i)]}}}
        return "/v1/generate", {"prompt": f"shape {i}", "steps": 3, "seed": 100 + i, "guidance": 7,
                                "image_prompts": [{"adapter": "ip_adapter", "images": [b64(REFS[i % 3])],
                                                   "scale": 0.2 + 0.1 * i}]}

    def result_of(http, i: int) -> np.ndarray:
        path, body = request(i)
        if path == "ui":  # the session owns the result folder: keep it alive while the PNG is read
            session = Session(app.state.engine)
            *_, (text, paths, parameters, job) = session.run(body)
            assert job.state == "done" and f"Seed: {100 + i}" in parameters
            return np.asarray(Image.open(paths[0]).convert("RGB"))
        response = http.post(path, json=body, timeout=120)
        assert response.status_code == 200, response.text
        body = response.json()
        return pixels_of(body["images"][0] if "info" in body else body["images"][0]["png"])

    alone = [result_of(client, i) for i in range(clients)]
    results: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        with TestClient(app) as own:
            results[i] = result_of(own, i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == list(range(clients))
    for i in range(clients):
        np.testing.assert_array_equal(results[i], alone[i], err_msg=f"request {i}")
    assert len({a.tobytes() for a in alone}) == clients


def test_a_client_that_leaves_does_not_wedge_the_queue():
    app = create_app(ServerConfig(ui=False))
    engine = app.state.engine
    try:
        with running(app) as url:
            long = {"prompt": "slow", "steps": 400, "seed": 1, "n_iter": 4}
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{url}/sdapi/v1/txt2img", json=long, timeout=1.5)
            deadline = time.monotonic() + 30
            while engine.current is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            left = [j for j in engine.jobs() if j.request.steps == 400]
            assert [j.state for j in left] == ["cancelled"]
            quick = httpx.post(f"{url}/sdapi/v1/txt2img", json={"steps": 2, "seed": 2}, timeout=30)
            assert quick.status_code == 200

            # A cancelled job frees its slot: the next one runs.
            job = httpx.post(f"{url}/v1/jobs", json={"steps": 400, "num_images": 4, "seed": 1}, timeout=10).json()
            httpx.post(f"{url}/v1/jobs/{job['id']}/cancel", timeout=10)
            after = httpx.post(f"{url}/v1/generate", json={"steps": 2, "seed": 4}, timeout=30)
            assert after.status_code == 200
            assert httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=10).json()["state"] == "cancelled"
    finally:
        engine.close()


def test_multipart_upload_names_the_reference_by_its_file_name(client):
    body = {"prompt": "a red circle", "steps": 2, "seed": 9,
            "image_prompts": [{"adapter": "ip_adapter", "images": ["cat.png"], "scale": 0.5}]}
    job = client.post("/v1/jobs/upload", data={"request": json.dumps(body)},
                      files=[("files", ("cat.png", REFS[0].read_bytes(), "image/png"))])
    assert job.status_code == 202, job.text
    assert app_wait(client, job.json()["id"])["state"] == "done"
    (image,) = client.get(f"/v1/jobs/{job.json()['id']}/result").json()["images"]
    assert "Images: cat.png" in image["parameters"]
    missing = client.post("/v1/jobs/upload", data={"request": json.dumps(body)})
    assert missing.status_code == 422
    assert "'cat.png' is not among the uploaded files (none)" in missing.json()["detail"]


def app_wait(client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


@pytest.mark.slow  # about 7 s: a tune and four generations
def test_tune_over_http_equals_imprompt_tune_and_its_embeds_generate(client, tmp_path):
    tuned = client.post("/v1/tune", json={"adapter": "ip_adapter", "images": [b64(REFS[0])], "steps": 3, "seed": 2})
    assert tuned.status_code == 200, tuned.text
    out = tuned.json()
    assert out["kind"] == "tune" and out["state"] == "done" and out["step"] == 3 and len(out["losses"]) == 3
    cli_file = tmp_path / "cli.safetensors"
    assert main(["tune", "--image", str(REFS[0]), "--steps", "3", "--seed", "2", "-o", str(cli_file),
                 "--no-progress"]) == 0
    served = embeds_from_bytes(base64.b64decode(out["embeds"]))
    assert torch.equal(served.conditional, load_embeds(cli_file).conditional)  # the CLI's features, bit for bit
    assert json.loads(served.tuning)["steps"] == 3

    # Sent back as an image prompt's embeds (base64, or a multipart file): `generate --embeds`'s pixels.
    body = {"prompt": "a red circle", "steps": 4, "seed": 3, "guidance": 7,
            "image_prompts": [{"adapter": "ip_adapter", "embeds": out["embeds"], "scale": 0.7}]}
    served_png = client.post("/v1/generate", json=body)
    assert served_png.status_code == 200, served_png.text
    cli = cli_pixels(tmp_path, "--adapter", str(toy.toy_paths()["adapter"]), "--embeds", str(cli_file),
                     "--scale", "0.7")
    np.testing.assert_array_equal(pixels_of(served_png.json()["images"][0]["png"]), cli)
    body["image_prompts"][0]["embeds"] = "subject.safetensors"
    job = client.post("/v1/jobs/upload", data={"request": json.dumps(body)},
                      files=[("files", ("subject.safetensors", cli_file.read_bytes(), "application/octet-stream"))])
    assert job.status_code == 202, job.text
    assert app_wait(client, job.json()["id"])["state"] == "done"
    (image,) = client.get(f"/v1/jobs/{job.json()['id']}/result").json()["images"]
    assert "Embeds: subject.safetensors" in image["parameters"]
    np.testing.assert_array_equal(pixels_of(image["png"]), cli)

    # Refused in the CLI's words: a picture sent as embeds, embeds with images, a bad setting.
    body["image_prompts"][0]["embeds"] = b64(REFS[0])
    png = client.post("/v1/generate", json=body)
    assert png.status_code == 422 and "image_prompts[0].embeds: neither a .safetensors file" in png.json()["detail"]
    body["image_prompts"][0].update(embeds=out["embeds"], images=[b64(REFS[0])])
    both = client.post("/v1/generate", json=body)
    assert both.status_code == 422 and "give one or the other" in both.json()["detail"]
    bad = client.post("/v1/tune", json={"adapter": "ip_adapter", "images": [b64(REFS[0])], "init": "zeros"})
    assert bad.status_code == 422 and "init must be one of encoder, unconditional" in bad.json()["detail"]


def test_a_queued_tuning_job_reports_its_steps_and_can_be_cancelled(client):
    body = {"adapter": "ip_adapter", "images": [b64(REFS[1])], "steps": 2}
    job = client.post("/v1/tune/jobs", json=body)
    assert job.status_code == 202 and job.json()["kind"] == "tune" and job.json()["total_steps"] == 2
    status = app_wait(client, job.json()["id"])
    assert status["state"] == "done" and status["step"] == 2
    result = client.get(f"/v1/jobs/{job.json()['id']}/result").json()
    assert len(result["losses"]) == 2 and embeds_from_bytes(base64.b64decode(result["embeds"])).references == 1
    long = client.post("/v1/tune/jobs", json={**body, "steps": 400}).json()
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{long['id']}").json()["step"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.post(f"/v1/jobs/{long['id']}/cancel")
    stopped = app_wait(client, long["id"])
    assert stopped["state"] == "cancelled" and 1 <= stopped["step"] < 400


def test_the_shipped_toy_controlnet_through_the_native_api(client):
    """Issue 16: the package's ControlNet is listed by name and runs with the toy_silhouette preprocessor; the
    returned map is the silhouette the reader draws, and the generation puts the shape where the map says."""
    from imprompt.toy.judge import read
    from imprompt.toy.reader import silhouette_of

    folder = toy.toy_paths()["references"]
    # the layout (large, centre) and the look (small, right) differ: a generation copying the look is caught
    layout, look = folder / "solid-yellow-square-on-green.png", folder / "dotted-cyan-circle-on-red.png"
    response = client.post("/v1/generate", json={
        "prompt": "a square", "steps": 20, "seed": 0, "guidance": 3, "save_control_map": True,
        "image_prompts": [{"adapter": "ip_adapter", "images": [b64(look)], "scale": 0.5}],
        "controlnets": [{"controlnet": "controlnet", "image": b64(layout), "scale": 1.5,
                         "preprocess": "toy_silhouette"}]})
    assert response.status_code == 200, response.text
    body = response.json()
    np.testing.assert_array_equal(pixels_of(body["control_maps"][0]["png"]),
                                  np.asarray(silhouette_of(Image.open(layout)).convert("RGB")))
    generated = read(pixels_of(body["images"][0]["png"]))
    assert (generated.size, generated.position) == ("large", "center")
