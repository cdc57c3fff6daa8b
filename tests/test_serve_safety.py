"""`healthgpt serve` beyond localhost: API keys on every route (API and web UI), the refusal to bind
other interfaces without one, limits before work (body size, text length, max_tokens, deadline), the
bounded queue (429), cancellation of a disconnected client's job, no prompts or keys in the logs, the
UI's examples and model card; and a server restarted under load (slow)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("gradio")
openai = pytest.importorskip("openai")

from healthgpt.serving.guard import ApiKeys, is_loopback, read_api_keys  # noqa: E402
from healthgpt.serving.infer import load_model  # noqa: E402
from healthgpt.serving.service import ServeSettings, Service  # noqa: E402
from tests.serve_helpers import CHROMIUM, free_port, image_message, launch_chromium, running_server, scan_png  # noqa: E402

MODEL = "healthgpt-tiny"
KEY = "test-key-" + "k" * 24
OTHER_KEY = "second-key-" + "q" * 20


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model("tiny")  # random weights: it never stops early, so long answers stay long


@pytest.fixture(scope="module")
def keyed(model):
    svc = Service(model, None, ServeSettings(model_name=MODEL, default_max_tokens=8, api_keys=(KEY, OTHER_KEY)))
    with running_server(svc, ui=True) as url:
        yield svc, url
    svc.close()


@pytest.fixture(scope="module")
def small_queue(model):
    """One request decoded at a time, one waiting: the rest are refused."""
    svc = Service(model, None, ServeSettings(model_name=MODEL, default_max_tokens=8, max_batch=1, max_queue=1,
                                             max_tokens_limit=3000))
    with running_server(svc, ui=False) as url:
        yield svc, url
    svc.close()


def _chat(text: str = "Hello?", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def _server_log(caplog) -> str:
    """Everything the server side logged (the test's own httpx/httpcore client logs its headers at DEBUG)."""
    return "\n".join(r.getMessage() + str(r.args) for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))


# ------------------------------------------------------------------------------------ authentication

UI_ROUTES = [("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"), ("GET", "/gradio_api/config"),
             ("POST", "/gradio_api/queue/join"), ("POST", "/gradio_api/run/predict"), ("POST", "/gradio_api/upload"),
             ("GET", "/gradio_api/file=/etc/hostname"), ("GET", "/docs"), ("GET", "/openapi.json")]
API_ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/images/edits")]


def test_every_route_needs_the_key_with_plain_http(keyed, caplog) -> None:
    _, url = keyed
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=url, timeout=30, follow_redirects=False) as http:
        for method, path in API_ROUTES + UI_ROUTES:
            for headers in ({}, {"authorization": "Bearer wrong-key-123456"}, {"authorization": f"Basic {KEY}"},
                            {"authorization": f"Bearer {KEY}x"}):
                r = http.request(method, path, headers=headers, json={} if method == "POST" else None)
                assert r.status_code == 401, (method, path, headers, r.status_code)
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
                assert r.headers["www-authenticate"].startswith("Bearer")
        # a browser asking for the page is sent to the login form instead
        r = http.get("/", headers={"accept": "text/html"})
        assert r.status_code == 303 and r.headers["location"] == "/login"
        assert "not for clinical use" in http.get("/login").text
        # /healthz stays open and says nothing secret
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["auth"] is True
        assert KEY not in health.text and OTHER_KEY not in health.text
        # either key opens the API; the answer works
        for key in (KEY, OTHER_KEY):
            r = http.post("/v1/chat/completions", json=_chat(max_tokens=3), headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert http.get("/gradio_api/info", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        # the login form sets a session cookie that opens the UI (and its API routes), never /v1
        r = http.post("/login", data={"key": "not-the-key-1234"})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = http.post("/login", data={"key": KEY})
        assert r.status_code == 303 and "HttpOnly" in r.headers["set-cookie"]
        cookie = r.cookies["healthgpt_session"]
        assert KEY not in cookie
        jar = {"healthgpt_session": cookie}
        page = httpx.get(url + "/", cookies=jar, headers={"accept": "text/html"}, timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert httpx.get(url + "/gradio_api/info", cookies=jar, timeout=30).status_code == 200
        assert httpx.get(url + "/v1/models", cookies=jar, timeout=30).status_code == 401
        forged = {"healthgpt_session": "99999999999." + "0" * 64}
        assert httpx.get(url + "/gradio_api/info", cookies=forged, timeout=30).status_code == 401
    logged = _server_log(caplog)
    assert KEY not in logged and OTHER_KEY not in logged and cookie not in logged


def test_the_openai_client_gets_401_without_the_right_key(keyed) -> None:
    _, url = keyed
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key-123456", max_retries=0, timeout=30)
    for call in (lambda: bad.models.list(),
                 lambda: bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]),
                 lambda: bad.images.edit(model=MODEL, image=("ct.png", scan_png(1), "image/png"), prompt="x")):
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == [MODEL]
    assert good.chat.completions.create(model=MODEL, messages=image_message(scan_png(2), "?"), max_tokens=2).usage


def test_keys_compare_and_sessions() -> None:
    keys = ApiKeys([KEY])
    assert keys.check(KEY) and not keys.check(KEY[:-1]) and not keys.check(None) and not keys.check("")
    assert KEY not in repr(keys)
    session = keys.new_session(now=1000.0)
    assert keys.check_session(session, now=1001.0)
    assert not keys.check_session(session, now=1000.0 + 13 * 3600)  # expired
    assert not ApiKeys([KEY]).check_session(session, now=1001.0)  # another process's secret: a restart signs out
    assert not keys.check_session(session.split(".")[0] + ".abc", now=1001.0)


def test_key_sources_and_loopback(tmp_path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text("# our lab's keys\nfirst-key-0123456\n\nsecond-key-0123456\n")
    assert read_api_keys(["cli-key-0123456"], f, "env-key-0123456,first-key-0123456") == \
        ["cli-key-0123456", "first-key-0123456", "second-key-0123456", "env-key-0123456"]
    with pytest.raises(ValueError, match="too short") as info:
        read_api_keys(["short"])
    assert "short" not in str(info.value).replace("too short", "")  # the message never shows a key
    with pytest.raises(ValueError, match="no key"):
        (tmp_path / "empty.txt").write_text("# nothing\n")
        read_api_keys([], tmp_path / "empty.txt")
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "example.org")))


def test_binding_other_interfaces_without_a_key_is_refused(monkeypatch) -> None:
    from typer.testing import CliRunner

    from healthgpt.cli import app

    monkeypatch.delenv("HEALTHGPT_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.2"):
        t0 = time.monotonic()
        r = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--host", host, "--port", str(free_port())])
        out = " ".join(r.output.split())
        assert r.exit_code == 2, out
        assert f"--host {host}" in out and "no API key" in out and "--api-key-file" in out
        assert "--insecure-no-auth" in out and len(r.output.strip().splitlines()) == 1
        assert time.monotonic() - t0 < 5  # refused before the model loads
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--api-key", "abcdef"])
    assert r.exit_code == 2 and "too short" in r.output and "abcdef" not in r.output
    monkeypatch.setenv("HEALTHGPT_API_KEY", "abcdef")
    r = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "too short" in r.output and "abcdef" not in r.output


def test_serve_start_errors_are_one_plain_line(tmp_path, monkeypatch) -> None:
    """Start-up errors go through the project's one-line printer: brackets in a name are not markup, and a
    --max-tokens over the limit is refused before the model loads."""
    from typer.testing import CliRunner

    from healthgpt.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HEALTHGPT_API_KEY", raising=False)
    Path("keys[prod].txt").write_text("# the keys go here\n", "utf-8")
    r = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--api-key-file", "keys[prod].txt"])
    assert r.exit_code == 2, r.output
    assert r.output.splitlines() == ["error: --api-key-file keys[prod].txt: no key in the file"], r.output
    t0 = time.monotonic()
    r = CliRunner().invoke(app, ["serve", "--preset", "tiny", "--max-tokens", "2048", "--max-tokens-limit", "1024"])
    assert r.exit_code == 2, r.output
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --max-tokens 2048 is over --max-tokens-limit 1024"), lines
    assert time.monotonic() - t0 < 5  # refused before the model loads


# ------------------------------------------------------------------------------------ limits before work

def test_text_that_cannot_fit_is_refused_before_tokenising(keyed, monkeypatch) -> None:
    svc, url = keyed
    calls = []
    real = svc.model.tokenizer.encode
    monkeypatch.setattr(svc.model.tokenizer, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    text = "lorem ipsum " * 400_000  # 4.8 M characters, within the body limit
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(text), headers={"authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "characters" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 2 and not calls
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=2000),
                   headers={"authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "--max-tokens-limit" in r.json()["error"]["message"]


def test_a_body_over_the_limit_is_refused_while_it_streams(keyed) -> None:
    svc, url = keyed
    limit = svc.settings.max_request_bytes
    host, port = url.removeprefix("http://").split(":")
    # declared too large: refused from the headers, the body is never read
    with socket.create_connection((host, int(port)), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {60 * 2**20}\r\n\r\n".encode() + b"{" * 65536)
        head = s.recv(65536).decode("latin-1")
        assert head.startswith("HTTP/1.1 413") and time.monotonic() - t0 < 1, head
        assert "request_too_large" in head
    # chunked, no length: refused once the bytes read pass the limit
    sent = [0]

    def body():
        while sent[0] < 60 * 2**20:
            sent[0] += 2**20
            yield b" " * 2**20

    t0 = time.monotonic()
    try:
        r = httpx.post(f"{url}/v1/chat/completions", content=body(), timeout=30,
                       headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    except httpx.TransportError:  # the server closed the connection after answering: also a refusal
        pass
    assert time.monotonic() - t0 < 5 and sent[0] < limit + 8 * 2**20
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=2), headers={"authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == 200


# ------------------------------------------------------------------------------------ backpressure, cancellation

def _health(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=10).json()


def _wait_for(cond, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached")
        time.sleep(0.01)
    return time.monotonic() - t0


def test_a_full_queue_answers_429_with_retry_after(small_queue) -> None:
    svc, url = small_queue
    before = _health(url)["refused"]

    def one(i: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=_chat(f"Question {i}", max_tokens=80), timeout=60)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    codes = sorted(r.status_code for r in results)
    assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
    refused = [r for r in results if r.status_code == 429]
    for r in refused:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
    assert _health(url)["refused"] - before == len(refused)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    blocker = threading.Thread(target=lambda: one(99))
    blocker.start()
    _wait_for(lambda: _health(url)["running"] == 1)
    waiting = threading.Thread(target=lambda: one(98))
    waiting.start()
    _wait_for(lambda: _health(url)["queued"] == 1)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    blocker.join()
    waiting.join()


def _raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_disconnected_clients_job_stops(small_queue, stream) -> None:
    svc, url = small_queue
    # the time a full 2000-token answer takes, from a 100-token one (this random model never stops early)
    t0 = time.monotonic()
    short = httpx.post(f"{url}/v1/chat/completions", json=_chat("Tell a long story.", max_tokens=100), timeout=60)
    assert short.json()["usage"]["completion_tokens"] == 100
    full = (time.monotonic() - t0) * 20
    before = _health(url)
    s = _raw_request(url, _chat("Tell a long story.", max_tokens=2000, stream=stream))
    _wait_for(lambda: _health(url)["running"] == 1)
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # the first chunks arrived
    s.close()
    waited = _wait_for(lambda: _health(url)["running"] == 0 and _health(url)["cancelled"] == before["cancelled"] + 1)
    assert waited < min(2.0, full / 3), (waited, full)
    # a waiting job whose client leaves never reaches the model
    blocker = _raw_request(url, _chat("Tell a long story.", max_tokens=2000))
    _wait_for(lambda: _health(url)["running"] == 1)
    queued = _raw_request(url, _chat("Another story.", max_tokens=2000))
    _wait_for(lambda: _health(url)["queued"] == 1)
    batches = _health(url)["batches_run"]
    queued.close()
    blocker.close()
    _wait_for(lambda: _health(url)["cancelled"] == before["cancelled"] + 3 and _health(url)["running"] == 0)
    assert _health(url)["batches_run"] == batches + 1  # only the blocker ran
    r = httpx.post(f"{url}/v1/chat/completions", json=_chat(max_tokens=2), timeout=30)
    assert r.status_code == 200


def test_the_request_deadline_cancels_the_job(model) -> None:
    svc = Service(model, None, ServeSettings(model_name=MODEL, request_timeout_s=0.5, max_tokens_limit=3000))
    try:
        with running_server(svc, ui=False) as url:
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/chat/completions", json=_chat("Story?", max_tokens=2000), timeout=30)
            assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
            assert time.monotonic() - t0 < 2
            _wait_for(lambda: _health(url)["cancelled"] == 1 and _health(url)["running"] == 0)
            lines = []
            with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30,
                              json=_chat("Story?", max_tokens=2000, stream=True)) as resp:
                lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
            assert '"code": "timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
            assert _health(url)["timed_out"] == 2
            _wait_for(lambda: _health(url)["cancelled"] == 2)
    finally:
        svc.close()


# ------------------------------------------------------------------------------------ logs

def test_the_log_has_request_ids_and_sizes_never_prompts_or_images(keyed, caplog) -> None:
    _, url = keyed
    caplog.set_level(logging.DEBUG)
    secret = "PATIENT-JANE-DOE-1962"
    png = scan_png(7)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages":
                   image_message(png, f"Is {secret} sick?")}, headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "tool", "content": secret}]},
                   headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400
    access = [rec.getMessage() for rec in caplog.records if rec.name == "healthgpt.serve.access"]
    line = next(m for m in access if rid in m)
    assert "POST /v1/chat/completions 200" in line and "in=" in line and "ms" in line
    everything = _server_log(caplog)
    assert secret not in everything
    import base64

    assert base64.b64encode(png).decode()[:40] not in everything


# ------------------------------------------------------------------------------------ the UI's content

def test_ui_examples_synthetic_and_from_held_out_shards(small_run, tmp_path) -> None:
    from healthgpt.serving.ui import UiContent

    synthetic = UiContent.load(None)
    assert len(synthetic.chat) == 3 and len(synthetic.generation) == 3
    for row in synthetic.chat + synthetic.generation:
        assert Path(row[0]).is_file() and Path(row[0]).name.startswith("example-")
    from PIL import Image

    with Image.open(synthetic.chat[0][0]) as im:
        assert im.size == (256, 256)
    held = UiContent.load(small_run["run"], [small_run["comp"], small_run["gen"]])
    assert held.card is None  # a training run, not an export folder
    assert held.chat and all("val" in label for label in held.labels["chat"])  # comp's held-out samples
    assert held.chat[0][1] and "<image>" not in held.chat[0][1]
    with pytest.raises(ValueError, match="no held-out"):
        UiContent.load(None, [small_run["gen"]])  # train split only


@pytest.fixture(scope="module")
def exported(small_run, tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    from healthgpt.cli import app

    out = tmp_path_factory.mktemp("exports") / "healthgpt-tiny-export"
    result = CliRunner().invoke(app, ["export", str(small_run["run"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_model_card_summary_of_an_export_folder(exported) -> None:
    from healthgpt.serving.ui import UiContent

    card = UiContent.load(exported).card
    assert card is not None
    assert "`tiny`" in card and "| 3 | mixed |" in card and "comp" in card and "gen" in card
    assert "not for clinical use" in card and "Training data" in card
    assert str(exported.parent) not in card


@pytest.mark.slow
def test_web_ui_login_examples_and_model_card_in_headless_chromium(exported, tmp_path) -> None:
    """Sign in with the key, see the model card, click an example in each tab and get the model's answer."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from healthgpt.serving.infer import load_vq_decoder
    from healthgpt.serving.ui import UiContent

    torch.set_num_threads(1)
    svc = Service(load_model("tiny", checkpoint=exported), load_vq_decoder("tiny"),
                  ServeSettings(model_name=exported.name, default_max_tokens=16, api_keys=(KEY,)))
    svc.ui_content = UiContent.load(exported)
    first_image, first_question = svc.ui_content.chat[0]
    try:
        with running_server(svc, ui=True) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
            expected = client.chat.completions.create(
                model=exported.name, messages=image_message(Path(first_image).read_bytes(), first_question),
                max_tokens=16).choices[0].message.content
            assert expected
            with sync_api.sync_playwright() as p:
                browser = launch_chromium(p)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 1400})
                    page.goto(url + "/", timeout=60_000)
                    assert page.url.endswith("/login")
                    page.locator("#key").fill("wrong-key-1234567")
                    page.locator("#sign-in").click()
                    assert "not valid" in page.locator("#login-error").inner_text()
                    page.locator("#key").fill(KEY)
                    page.locator("#sign-in").click()
                    page.wait_for_url(url + "/", timeout=30_000)
                    page.locator("#research-banner").wait_for(timeout=60_000)
                    card = page.locator("#model-card").inner_text()
                    assert "tiny" in card and "not for clinical use" in card
                    page.get_by_text(svc.ui_content.labels["chat"][0]).first.click()
                    page.wait_for_function("([sel, want]) => document.querySelector(sel).value === want",
                                           arg=["#answer textarea", expected], timeout=60_000)
                    assert page.locator("#question textarea").input_value() == first_question
                    page.screenshot(path=str(tmp_path / "ui-examples.png"), full_page=True)

                    page.get_by_role("tab", name="Generate an image").click()
                    page.get_by_text(svc.ui_content.labels["generation"][0]).first.click()
                    page.locator("#gen-output img").first.wait_for(timeout=120_000)
                    page.screenshot(path=str(tmp_path / "ui-generate-example.png"), full_page=True)
                finally:
                    browser.close()
    finally:
        svc.close()
    assert (tmp_path / "ui-examples.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------ processes

def _start_server(port: int, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "healthgpt.cli", "serve", "--preset", "tiny", "--port", str(port),
                             "--no-ui", "--threads", "1", *extra], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_up(proc: subprocess.Popen, url: str, timeout: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("the server did not come up")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _post_declared(port: int, path: str, payload: bytes, sent: int = 2**16) -> int:
    """POST with a Content-Length of ``len(payload)``, send the headers and the first ``sent`` bytes of the body,
    then read the answer's status code (the server answers before the body is complete or not at all)."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + payload[:sent])
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(4096)
            assert chunk, f"the server closed the connection without an answer ({answer!r})"
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.slow
def test_a_60_mb_body_is_refused_at_once_and_memory_stays(tmp_path) -> None:
    """A real `healthgpt serve` process: 60 MB bodies are refused in under a second, and the server's resident
    memory rises by less than 50 MB. A declared Content-Length gets its 413 before the body is sent; a client
    that sends the whole body (declared or chunked) gets the 413 or sees the connection closed mid-send."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(port, tmp_path / "serve.log")
    try:
        _wait_up(proc, url)
        for _ in range(3):  # warm-up: first-call allocations of the answer path
            assert httpx.post(url + "/v1/chat/completions", json=_chat(max_tokens=4), timeout=60).status_code == 200
        rss0 = _rss_mb(proc.pid)
        payload = json.dumps(_chat("x" * (60 * 2**20))).encode()
        times, outcomes = [], []
        for how in ("declared", "chunked", "declared, httpx", "chunked"):
            t0 = time.monotonic()
            if how == "declared":
                # the 413 comes from the Content-Length header alone: a client that sent its headers and the
                # start of the body reads it (the server never reads the rest)
                outcome: int | str = _post_declared(port, "/v1/chat/completions", payload)
                assert outcome == 413, outcome
            else:
                try:
                    content = payload if how.startswith("declared") else (
                        payload[j: j + 2**20] for j in range(0, len(payload), 2**20))
                    outcome = httpx.post(url + "/v1/chat/completions", content=content, timeout=30,
                                         headers={"content-type": "application/json"}).status_code
                    assert outcome == 413, outcome
                except httpx.TransportError as err:  # refused and closed while the client was still sending
                    outcome = type(err).__name__
            times.append(time.monotonic() - t0)
            outcomes.append(f"{how}: {outcome}")
        rss1 = _rss_mb(proc.pid)
        assert httpx.post(url + "/v1/chat/completions", json=_chat(max_tokens=4), timeout=60).status_code == 200
        print(f"60 MB bodies refused in {', '.join(f'{t:.3f}' for t in times)} s ({'; '.join(outcomes)}); "
              f"server RSS {rss0:.0f} -> {rss1:.0f} MB")
        assert max(times) < 1.0, times
        assert rss1 - rss0 < 50, (rss0, rss1)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_a_server_restarted_under_load(tmp_path) -> None:
    """SIGTERM then a new process on the same port while 8 clients keep sending: every request ends with
    an answer or an error (none hangs), and the new process answers as soon as it is up."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    proc = _start_server(port, log)
    _wait_up(proc, url)
    stop = threading.Event()
    outcomes: list[tuple[str, float]] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(30, connect=5)) as http:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    r = http.post("/v1/chat/completions", json=_chat(f"Q{i}", max_tokens=40, stream=i % 2 == 1))
                    kind = "answer" if r.status_code == 200 else f"status {r.status_code}"
                except httpx.HTTPError as err:
                    kind = f"error {type(err).__name__}"
                    time.sleep(0.05)
                outcomes.append((kind, time.monotonic() - t0))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0 or proc.returncode in (0, -signal.SIGTERM)
        proc = _start_server(port, log)
        _wait_up(proc, url)
        n = len(outcomes)
        first = httpx.post(url + "/v1/chat/completions", json=_chat(max_tokens=4), timeout=30)
        assert first.status_code == 200  # the new process serves at once
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a client hung"
        kinds = {k for k, _ in outcomes}
        assert "answer" in {k for k, _ in outcomes[n:]}  # answers again after the restart
        assert max(s for _, s in outcomes) < 30
        assert all(k == "answer" or k.startswith(("error", "status 503")) for k in kinds), kinds
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)
