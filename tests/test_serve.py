"""`healthgpt serve`: the OpenAI-compatible API through the official `openai` client, bad input,
batching and slow clients, model failures, and the web UI in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("gradio")
openai = pytest.importorskip("openai")

from healthgpt.model.conversation import IMAGE_TOKEN_ID, encode_prompt  # noqa: E402
from healthgpt.serving.infer import answer, generate_image, load_model, load_vq_decoder  # noqa: E402
from healthgpt.serving.service import ServeSettings, Service  # noqa: E402
from tests.serve_helpers import CHROMIUM, data_url, image_message, launch_chromium, running_server, scan_png  # noqa: E402

MODEL = "healthgpt-tiny"
MAX_IMAGE_MB = 0.05


@pytest.fixture(scope="module")
def model(small_run):
    torch.set_num_threads(1)
    return load_model("tiny", checkpoint=small_run["run"])


@pytest.fixture(scope="module")
def vq():
    return load_vq_decoder("tiny")


@pytest.fixture(scope="module")
def service(model, vq):
    svc = Service(model, vq, ServeSettings(model_name=MODEL, max_image_mb=MAX_IMAGE_MB, default_max_tokens=16))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def base_url(service):
    with running_server(service) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _still_serves(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello?"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_models_and_healthz(client, base_url) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{base_url}/healthz").json()
    assert health["status"] == "ok" and health["model"] == MODEL and "clinical" in health["notice"]


def test_chat_answer_streamed_answer_and_usage(client, model) -> None:
    png = scan_png(1)
    question = "Is there a lesion?"
    expected = answer(model, Image.open(io.BytesIO(png)), question, max_new_tokens=12)
    assert expected  # the trained run answers something readable
    r = client.chat.completions.create(model=MODEL, messages=image_message(png, question), max_tokens=12)
    assert r.choices[0].message.content == expected
    ids = encode_prompt(model.tokenizer, question, template=model.template, image=True)
    assert r.usage.prompt_tokens == len(ids) - 1 + model.vision.num_patches
    assert ids.count(IMAGE_TOKEN_ID) == 1
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    stream = client.chat.completions.create(model=MODEL, messages=image_message(png, question), max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == expected
    assert finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_sampling_parameters(client) -> None:
    msgs = image_message(scan_png(2), "Describe the image.")
    short = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me more"}],
                                           max_tokens=3, temperature=1.5, seed=7)
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me more"}],
                                           max_tokens=3, temperature=1.5, seed=7)
    assert short.choices[0].message.content == again.choices[0].message.content  # seeded sampling repeats
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    greedy = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8).choices[0].message.content
    if len(greedy) > 1:
        cut = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, stop=[greedy[1:]])
        assert cut.choices[0].message.content == greedy[:1]
        assert cut.choices[0].finish_reason == "stop"
    nucleus = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=1.0, top_p=1e-6)
    assert nucleus.choices[0].message.content == client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4).choices[0].message.content  # top_p -> the argmax token


def _png_of(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == "PNG" and im.size == (256, 256)
        return np.asarray(im.convert("RGB"))


def test_image_generation_with_the_openai_client(client, model, vq) -> None:
    png = scan_png(3)
    instruction = "Convert this CT slice to an MRI slice."
    r = client.images.edit(model=MODEL, image=("ct.png", png, "image/png"), prompt=instruction)
    served = _png_of(r.data[0].b64_json)
    local = generate_image(model, Image.open(io.BytesIO(png)).convert("RGB"), instruction, vq=vq, constrained=True)
    np.testing.assert_array_equal(served, local.image)
    # the same through the chat endpoint with "task": "generation" (a documented extra field)
    chat = client.chat.completions.create(model=MODEL, messages=image_message(png, instruction),
                                          extra_body={"task": "generation"})
    np.testing.assert_array_equal(_png_of(chat.choices[0].message.model_extra["image"]["b64_json"]), served)


def _post(base_url: str, body: dict | str, path: str = "/v1/chat/completions") -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(base_url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(base_url + path, json=body, timeout=60)


def _big_png() -> bytes:
    png = scan_png(4, size=(400, 400))  # random pixels do not compress: ~160 KB
    assert len(png) > MAX_IMAGE_MB * 2**20
    return png


BAD_CHAT = {
    "undecodable image": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"not an image at all")}},
        {"type": "text", "text": "?"}]}]}, 400, "invalid_image"),
    "invalid base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@not-base64@@@"}}]}]}, 400, "invalid_image"),
    "image over --max-image-mb": (None, 413, "image_too_large"),
    "two images": (None, 400, "too_many_images"),
    "remote image url": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}]}, 400, "remote_images_disabled"),
    "generation without image": ({"task": "generation", "messages": [{"role": "user", "content": "Make an MRI"}]},
                                 400, "missing_image"),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    "temperature out of range": ({"temperature": 2.5, "messages": [{"role": "user", "content": "hi"}]}, 400,
                                 "invalid_value"),
    "top_p out of range": ({"top_p": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value"),
    "max_tokens zero": ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value"),
    "n > 1": ({"n": 2, "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value"),
    "prompt over the context": ({"messages": [{"role": "user", "content": "word " * 1000}]}, 400,
                                "context_length_exceeded"),
    "completion over the context": ({"max_tokens": 5000, "messages": [{"role": "user", "content": "hi"}]}, 400,
                                    "context_length_exceeded"),
    "placeholder typed in text": ({"messages": [{"role": "user", "content": "<image> hi"}]}, 400, "invalid_value"),
    "last message not from the user": ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "invalid_value"),
    "messages missing": ({"messages": None}, 400, "invalid_value"),
    "malformed json": ("{not json", 400, "invalid_value"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_input_is_refused_and_the_server_keeps_serving(case, base_url, client) -> None:
    body, status, code = BAD_CHAT[case]
    if case == "image over --max-image-mb":
        body = {"messages": image_message(_big_png(), "?")}
    if case == "two images":
        body = {"messages": image_message(scan_png(5), "?") + image_message(scan_png(6), "and this?")}
    if isinstance(body, dict):
        body = {"model": MODEL, **body}
    r = _post(base_url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text and "/work" not in r.text
    _still_serves(client)


BAD_EDIT = {
    "missing image": ({"prompt": "Convert this CT slice to an MRI slice."}, [], 400, "missing_image"),
    "undecodable image": ({"prompt": "x"}, [("image", ("a.png", b"garbage", "image/png"))], 400, "invalid_image"),
    "image over --max-image-mb": ({"prompt": "x"}, None, 413, "image_too_large"),
    "two images": ({"prompt": "x"}, [("image[]", ("a.png", scan_png(7), "image/png")),
                                     ("image[]", ("b.png", scan_png(8), "image/png"))], 400, "too_many_images"),
    "unknown model": ({"prompt": "x", "model": "dall-e-2"}, [("image", ("a.png", scan_png(9), "image/png"))], 404,
                      "model_not_found"),
    "wrong size": ({"prompt": "x", "size": "1024x1024"}, [("image", ("a.png", scan_png(9), "image/png"))], 400,
                   "invalid_value"),
    "url response": ({"prompt": "x", "response_format": "url"}, [("image", ("a.png", scan_png(9), "image/png"))],
                     400, "invalid_value"),
}


@pytest.mark.parametrize("case", list(BAD_EDIT))
def test_bad_image_request_is_refused(case, base_url, client) -> None:
    data, files, status, code = BAD_EDIT[case]
    if files is None:
        files = [("image", ("big.png", _big_png(), "image/png"))]
    r = httpx.post(f"{base_url}/v1/images/edits", data=data, files=files or [("unused", ("", b""))], timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    _still_serves(client)


def test_the_openai_client_sees_the_status(client) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x " * 3000}])
    assert "context length" in str(info.value)


def test_model_failure_is_a_500_with_a_request_id(service, base_url, client, caplog, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access (simulated)")

    monkeypatch.setattr(service.model, "generate", broken)
    with caplog.at_level(logging.ERROR, logger="healthgpt.serve"):
        r = _post(base_url, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        s = httpx.post(f"{base_url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 500
    rid = r.headers["x-request-id"]
    assert r.json()["error"]["type"] == "server_error" and rid in r.json()["error"]["message"]
    assert "illegal memory" not in r.text and "Traceback" not in r.text
    assert any(rid in rec.getMessage() for rec in caplog.records)
    assert any(rec.exc_info for rec in caplog.records)  # the traceback goes to the log
    assert s.status_code == 200 and '"server_error"' in s.text and s.text.rstrip().endswith("[DONE]")
    assert "illegal memory" not in s.text
    monkeypatch.undo()
    _still_serves(client)


def test_waiting_requests_are_batched_and_match_single_answers(service, client) -> None:
    pngs = [scan_png(20 + i) for i in range(6)]
    single = [client.chat.completions.create(model=MODEL, messages=image_message(p, f"Question {i}?"),
                                             max_tokens=6).choices[0].message.content for i, p in enumerate(pngs)]
    before = service.worker.batches_run
    results: dict[int, str] = {}
    gate = threading.Event()

    def ask(i: int) -> None:
        gate.wait()
        results[i] = client.chat.completions.create(model=MODEL, messages=image_message(pngs[i], f"Question {i}?"),
                                                    max_tokens=6).choices[0].message.content

    # hold the worker busy with one long request so that the others queue up behind it
    blocker = threading.Thread(target=lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=200))
    blocker.start()
    time.sleep(0.2)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(pngs))]
    for t in threads:
        t.start()
    gate.set()
    for t in threads + [blocker]:
        t.join(120)
    assert [results[i] for i in range(len(pngs))] == single
    # the 6 requests queued behind the blocker ran in fewer model batches than requests
    assert service.worker.batches_run - before < len(pngs) + 1


def test_a_client_that_stops_reading_does_not_block_others(base_url, client) -> None:
    host, port = base_url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 200,
                       "messages": [{"role": "user", "content": "Tell a long story."}]}).encode()
    stalled = socket.create_connection((host, int(port)))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:  # never read from `stalled`; everyone else must still be answered promptly
        t0 = time.monotonic()
        for i in range(3):
            client.chat.completions.create(model=MODEL, messages=image_message(scan_png(30 + i), "?"), max_tokens=4)
        assert time.monotonic() - t0 < 60
    finally:
        stalled.close()


@pytest.mark.slow
def test_web_ui_in_headless_chromium(base_url, client, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    png = scan_png(40)
    (tmp_path / "scan.png").write_bytes(png)
    question = "Is there a lesion?"
    expected = client.chat.completions.create(model=MODEL, messages=image_message(png, question),
                                              max_tokens=64).choices[0].message.content
    with sync_api.sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base_url + "/", wait_until="networkidle", timeout=60_000)
            assert "not for clinical use" in page.locator("#research-banner").inner_text()
            page.locator("#chat-image input[type=file]").set_input_files(str(tmp_path / "scan.png"))
            page.locator("#chat-image img").first.wait_for(timeout=30_000)
            page.locator("#question textarea").fill(question)
            page.locator("#ask").click()
            box = page.locator("#answer textarea")
            page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want",
                                   arg=["#answer textarea", expected], timeout=60_000)
            assert box.input_value() == expected
            page.screenshot(path=str(tmp_path / "ui-chat.png"), full_page=True)

            page.get_by_role("tab", name="Generate an image").click()
            page.locator("#gen-input input[type=file]").set_input_files(str(tmp_path / "scan.png"))
            page.locator("#gen-input img").first.wait_for(timeout=30_000)
            page.locator("#generate").click()
            page.locator("#gen-output img").first.wait_for(timeout=120_000)
            link = page.locator("#gen-download a").first
            link.wait_for(timeout=30_000)
            with page.expect_download() as download:
                link.click()
            saved = tmp_path / "downloaded.png"
            download.value.save_as(saved)
            page.screenshot(path=str(tmp_path / "ui-generate.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "ui-chat.png").stat().st_size > 10_000
    with Image.open(saved) as im:
        assert im.format == "PNG" and im.size == (256, 256)


def test_multi_turn_and_system_messages(client, model) -> None:
    png = scan_png(70)
    one = client.chat.completions.create(model=MODEL, messages=image_message(png, "Is there a lesion?"), max_tokens=4)
    history = [{"role": "system", "content": "You answer briefly."}, *image_message(png, "Is there a lesion?"),
               {"role": "assistant", "content": one.choices[0].message.content},
               {"role": "user", "content": "Are you sure?"}]
    more = client.chat.completions.create(model=MODEL, messages=history, max_tokens=4)
    from healthgpt.model.conversation import encode_chat_prompt, get_template

    tpl = get_template(model.template)
    turns = [{"from": "human", "value": "<image>\nIs there a lesion?"},
             {"from": "gpt", "value": one.choices[0].message.content}, {"from": "human", "value": "Are you sure?"}]
    ids = encode_chat_prompt(model.tokenizer, turns,
                             template=tpl.with_system(tpl.system.split("\n")[0] + "\nYou answer briefly."))
    assert more.usage.prompt_tokens == len(ids) - 1 + model.vision.num_patches > one.usage.prompt_tokens
    text = model.tokenizer.decode([i for i in ids if i >= 0])
    assert "You answer briefly." in text and text.count("Is there a lesion?") == 1 and "Are you sure?" in text


def test_remote_images_only_when_allowed(service, client, base_url, monkeypatch, tmp_path) -> None:
    import functools
    import http.server

    png = scan_png(80)
    (tmp_path / "scan.png").write_bytes(png)
    (tmp_path / "big.png").write_bytes(_big_png())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        def ask(url: str) -> httpx.Response:
            return _post(base_url, {"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Is there a lesion?"}]}]})

        assert ask(f"{remote}/scan.png").json()["error"]["code"] == "remote_images_disabled"
        monkeypatch.setattr(service.settings, "allow_remote_images", True)
        fetched = ask(f"{remote}/scan.png")
        inline = client.chat.completions.create(model=MODEL, messages=image_message(png, "Is there a lesion?"),
                                                max_tokens=6)
        assert fetched.status_code == 200 and fetched.json()["choices"][0]["message"]["content"] == \
            inline.choices[0].message.content
        assert ask(f"{remote}/big.png").status_code == 413
        assert ask(f"{remote}/missing.png").json()["error"]["code"] == "invalid_image"
    finally:
        httpd.shutdown()
