"""Input images of API requests: ``data:`` URLs (base64 PNG/JPEG), uploads, optional remote URLs.

Every refusal is an ``ApiError`` naming the request field and the reason; the size limit is
checked on the encoded length before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from healthgpt.serving.errors import ApiError

__all__ = ["decode_image_bytes", "image_from_url", "png_base64"]

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?);base64,(?P<data>.*)$", re.S)
ACCEPTED_FORMATS = ("PNG", "JPEG")


def _too_large(param: str, n_bytes: int, max_bytes: int) -> ApiError:
    return ApiError(413, f"{param}: the image is {n_bytes / 2**20:.1f} MiB, over this server's limit of "
                         f"{max_bytes / 2**20:g} MiB (--max-image-mb)", code="image_too_large", param=param)


def decode_image_bytes(data: bytes, *, param: str, max_bytes: int) -> Image.Image:
    """Open PNG/JPEG bytes as an RGB PIL image or raise ``ApiError`` (400/413)."""
    if len(data) > max_bytes:
        raise _too_large(param, len(data), max_bytes)
    if not data:
        raise ApiError(400, f"{param}: the image is empty", code="invalid_image", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                if fmt not in ACCEPTED_FORMATS:
                    raise ApiError(400, f"{param}: image format {fmt} is not accepted (PNG or JPEG)",
                                   code="invalid_image", param=param)
                im.load()
                return im.convert("RGB")
    except ApiError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL names the stream it could not identify by its repr (a memory address): never part of a message
        why = "not a recognisable image" if isinstance(err, UnidentifiedImageError) else str(err)
        raise ApiError(400, f"{param}: the image cannot be decoded as PNG or JPEG ({why})",
                       code="invalid_image", param=param) from err


def image_from_url(url: str, *, param: str, max_bytes: int, allow_remote: bool) -> Image.Image:
    """An ``image_url`` value: a ``data:`` URL, or (with ``--allow-remote-images``) http(s)."""
    m = _DATA_URL.match(url)
    if m:
        payload = m.group("data")
        if len(payload) * 3 // 4 > max_bytes + 3:  # decoded size, known before decoding
            raise _too_large(param, len(payload) * 3 // 4, max_bytes)
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ApiError(400, f"{param}: the data URL is not valid base64 ({err})", code="invalid_image",
                           param=param) from err
        return decode_image_bytes(raw, param=param, max_bytes=max_bytes)
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ApiError(400, f"{param}: remote image URLs are refused by this server (start it with "
                                "--allow-remote-images); send the image as a data: URL (base64 PNG/JPEG)",
                           code="remote_images_disabled", param=param)
        return decode_image_bytes(_fetch(url, param=param, max_bytes=max_bytes), param=param, max_bytes=max_bytes)
    raise ApiError(400, f"{param}: expected a data:image/png;base64,... or data:image/jpeg;base64,... URL",
                   code="invalid_image", param=param)


def _fetch(url: str, *, param: str, max_bytes: int) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=True) as resp:
            resp.raise_for_status()
            chunks, total = [], 0
            for chunk in resp.iter_bytes():
                total += len(chunk)
                if total > max_bytes:
                    raise _too_large(param, total, max_bytes)
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as err:
        raise ApiError(400, f"{param}: the remote image could not be fetched ({type(err).__name__})",
                       code="invalid_image", param=param) from err


def png_base64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
