"""What every HTTP request passes before it reaches the API or the web UI (one pure ASGI middleware).

In order, for every request:

1. **A request id** (``x-request-id`` on every response; ``scope["state"]["request_id"]`` for the routes).
2. **Authentication**, when the server has API keys (``--api-key``, ``HEALTHGPT_API_KEY``, ``--api-key-file``):
   ``/healthz`` is open; ``/v1/*`` needs ``Authorization: Bearer <key>`` (401 in OpenAI's error format);
   every other path (the Gradio UI, its ``/gradio_api/*`` routes and websockets, ``/docs``) accepts the
   same header or the session cookie set by ``POST /login`` (a browser asking for a page is sent to
   ``/login``). Keys are compared in constant time (``hmac.compare_digest``); the cookie is an expiry
   signed with a per-process secret, so a restart signs everyone out. Keys and cookies are never logged.
3. **The request-body limit**, before anything parses the body: a ``Content-Length`` over the limit is
   refused at once (413, the body is never read); a body without one is counted while it streams in and
   refused as soon as it passes the limit. The body is then handed to the app from memory.
4. **One access-log line** per request (``healthgpt.serve.access`` at INFO): request id, method, route,
   status, bytes in and out, milliseconds. Never a query string, a header, the prompt or an image:
   Gradio file routes are logged without the file name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from healthgpt.serving.errors import error_body, new_request_id

__all__ = ["ApiKeys", "RequestGuard", "SESSION_COOKIE", "is_loopback", "read_api_keys"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

access_log = logging.getLogger("healthgpt.serve.access")

SESSION_COOKIE = "healthgpt_session"
SESSION_SECONDS = 12 * 3600
OPEN_PATHS = ("/healthz",)
_BODY_METHODS = ("POST", "PUT", "PATCH")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_keys(keys: Sequence[str] = (), key_file: Path | None = None, env: str | None = None) -> list[str]:
    """The server's API keys from ``--api-key`` values, ``--api-key-file`` (one per line, ``#`` comments)
    and ``HEALTHGPT_API_KEY``; refuses empty or short keys (the message never shows a key)."""
    out = [k.strip() for k in keys]
    if key_file is not None:
        try:
            text = Path(key_file).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--api-key-file {Path(key_file).name}: cannot read it ({type(err).__name__})") from err
        out += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not out:
            raise ValueError(f"--api-key-file {Path(key_file).name}: no key in the file")
    if env:
        out += [k.strip() for k in env.split(",") if k.strip()]
    for i, key in enumerate(out):
        if len(key) < 8 or any(c.isspace() for c in key):
            raise ValueError(f"API key #{i + 1} is too short or has spaces: use at least 8 characters "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
    return list(dict.fromkeys(out))


class ApiKeys:
    """The accepted keys; :meth:`check` compares with every key in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]
        self._secret = secrets.token_bytes(32)

    def __repr__(self) -> str:  # never the keys
        return f"ApiKeys({len(self._digests)} key(s))"

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, key: str | None) -> bool:
        if key is None:
            return False
        given = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for digest in self._digests:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(given, digest)
        return ok

    def new_session(self, now: float | None = None) -> str:
        expiry = int((now or time.time()) + SESSION_SECONDS)
        return f"{expiry}.{self._sign(expiry)}"

    def check_session(self, value: str | None, now: float | None = None) -> bool:
        if not value or "." not in value:
            return False
        expiry, sig = value.split(".", 1)
        if not expiry.isdigit() or int(expiry) < (now or time.time()):
            return False
        return hmac.compare_digest(sig, self._sign(int(expiry)))

    def _sign(self, expiry: int) -> str:
        return hmac.new(self._secret, str(expiry).encode(), hashlib.sha256).hexdigest()


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _bearer(headers: dict[str, str]) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def _route(path: str) -> str:
    """The path as logged: Gradio file routes without the file name (it may name a patient)."""
    for marker in ("/file=", "/file/", "/upload"):
        cut = path.find(marker)
        if cut >= 0:
            return path[: cut + len(marker)] + ("…" if len(path) > cut + len(marker) else "")
    return path if len(path) <= 80 else path[:80] + "…"


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app: Any, *, keys: ApiKeys, max_body_bytes: int, ui: bool = True) -> None:
        self.app = app
        self.keys = keys
        self.max_body = int(max_body_bytes)
        self.ui = ui

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if self.keys.enabled and not self._authorised(scope, _headers(scope)):
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.perf_counter()
        sent = {"status": 0, "bytes": 0}

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = int(message["status"])
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        bytes_in = 0
        try:
            bytes_in = await self._handle(scope, receive, send_logged, rid)
        finally:
            status = sent["status"] or 499  # 499: the client went away before an answer
            access_log.info("%s %s %s %d in=%d out=%d %.0fms", rid, scope.get("method", "?"),
                            _route(scope.get("path", "")), status, bytes_in, sent["bytes"],
                            (time.perf_counter() - t0) * 1000)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, rid: str) -> int:
        path: str = scope.get("path", "")
        headers = _headers(scope)
        if self.keys.enabled and path not in OPEN_PATHS:
            if path == "/login" and self.ui:
                return await self._login(scope, receive, send, headers)
            if path == "/logout" and self.ui:
                await _respond(send, 303, b"", [(b"location", b"/login"), (b"set-cookie", _clear_cookie())])
                return 0
            if not self._authorised(scope, headers):
                await self._refuse_unauthorised(scope, send, headers)
                return 0
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await self._too_large(send, int(length) if length.isdigit() else None)
            return 0
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return 0
        try:
            body = await self._read_body(receive)
        except _BodyTooLarge:
            await self._too_large(send, None)
            return self.max_body
        if body is None:  # the client went away while sending
            return 0
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real stream: http.disconnect when the client goes away

        await self.app(scope, replay, send)
        return len(body)

    async def _read_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authorised(self, scope: Scope, headers: dict[str, str]) -> bool:
        if self.keys.check(_bearer(headers)):
            return True
        path: str = scope.get("path", "")
        # the session cookie opens the UI only; API clients send their key
        return self.ui and not path.startswith("/v1") and self.keys.check_session(_cookie(headers, SESSION_COOKIE))

    async def _refuse_unauthorised(self, scope: Scope, send: Send, headers: dict[str, str]) -> None:
        path: str = scope.get("path", "")
        wants_page = scope.get("method") == "GET" and "text/html" in headers.get("accept", "")
        if self.ui and wants_page and not path.startswith("/v1"):
            await _respond(send, 303, b"", [(b"location", b"/login")])
            return
        given = _bearer(headers) is not None
        message = ("Incorrect API key provided." if given else
                   "You didn't provide an API key. Send it as the header 'Authorization: Bearer YOUR_KEY' "
                   "(the openai client's api_key).")
        await _json(send, 401, error_body(message, type="invalid_request_error", code="invalid_api_key"),
                    [(b"www-authenticate", b'Bearer realm="healthgpt"')])

    async def _too_large(self, send: Send, length: int | None) -> None:
        size = f"{length / 2**20:.1f} MiB" if length is not None else "more than that"
        await _json(send, 413, error_body(
            f"The request body is {size}; this server accepts at most {self.max_body / 2**20:.1f} MiB "
            "(--max-request-mb).", type="invalid_request_error", code="request_too_large"),
            [(b"connection", b"close")])

    async def _login(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> int:
        if scope.get("method") == "POST":
            length = headers.get("content-length", "0")
            if not length.isdigit() or int(length) > 8192:
                await self._too_large(send, int(length) if length.isdigit() else None)
                return 0
            body = await self._read_body(receive) or b""
            key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0]
            if self.keys.check(key):
                cookie = (f"{SESSION_COOKIE}={self.keys.new_session()}; Path=/; HttpOnly; SameSite=Strict; "
                          f"Max-Age={SESSION_SECONDS}")
                await _respond(send, 303, b"", [(b"location", b"/"), (b"set-cookie", cookie.encode())])
                return len(body)
            await _html(send, 401, _login_page("That key is not valid."))
            return len(body)
        await _html(send, 200, _login_page(None))
        return 0


def _clear_cookie() -> bytes:
    return f"{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0".encode()


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    await _respond(send, status, json.dumps(obj).encode(), [(b"content-type", b"application/json"), *headers])


async def _html(send: Send, status: int, text: str) -> None:
    await _respond(send, status, text.encode(), [(b"content-type", b"text/html; charset=utf-8"),
                                                 (b"cache-control", b"no-store")])


def _login_page(error: str | None) -> str:
    from healthgpt.serving.service import RESEARCH_NOTICE

    note = f'<p id="login-error" style="color:#b00">{error}</p>' if error else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>HealthGPT: sign in</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto">
<h2>HealthGPT</h2><p><b>Research use only, not for clinical use.</b> {RESEARCH_NOTICE}</p>
<form method="post" action="/login"><label>API key <input id="key" name="key" type="password" autocomplete="current-password"
 autofocus></label> <button id="sign-in" type="submit">Sign in</button></form>{note}
<p style="color:#555">The key is the one the server was started with (--api-key, --api-key-file or HEALTHGPT_API_KEY).</p>
</body></html>"""


def env_api_keys() -> str | None:
    return os.environ.get("HEALTHGPT_API_KEY")
