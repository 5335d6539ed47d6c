"""Optional media download: the bytes of an image, voice message or document, fetched through
the Graph media endpoint into the data folder (``download_media = true``, off by default).

WhatsApp keeps media for a limited time and only hands it out with the business's token, so
an installation that wants to keep what residents sent fetches it as it arrives. Two requests:
``GET {graph_url}/{version}/{media_id}`` answers a short-lived URL, and a ``GET`` on that URL,
with the same bearer token, answers the bytes. A failed download never costs the message: it is
stored with its media id, and the failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from router.files import write_durably
from router.hookspecs import read_provider_json

from .settings import WhatsAppSettings

MEDIA_FOLDER = "media/whatsapp"
"""Where downloads go, relative to the data folder."""

_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_EXTENSIONS = {"audio/ogg": ".ogg", "image/jpeg": ".jpg", "image/webp": ".webp", "video/mp4": ".mp4", "audio/mpeg": ".mp3"}


class MediaError(Exception):
    """A download that did not work out; the message is kept without the bytes."""


def relative_path(media_id: str, mime_type: str | None) -> str:
    """The file a media id is kept in, relative to the data folder: the id itself when it is
    a plain token (so a redelivery finds the file), else its hash; the extension from the type."""
    stem = media_id if _SAFE.match(media_id) else hashlib.sha256(media_id.encode()).hexdigest()[:40]
    base = (mime_type or "").split(";")[0].strip().lower()
    extension = _EXTENSIONS.get(base) or (mimetypes.guess_extension(base) if base else None) or ".bin"
    return f"{MEDIA_FOLDER}/{stem}{extension}"


def may_fetch(url: str, graph_url: str) -> bool:
    """Whether the download URL the Graph API gave may get the business's token: an ``https``
    URL (Meta's media host), or the Graph API's own origin (a test's or a proxy's). Anything
    else (``http://169.254.169.254/...``, an internal service) would be fetched from inside the
    network with the token in its headers."""
    try:
        target, graph = urlsplit(url), urlsplit(graph_url)
    except ValueError:
        return False
    if target.scheme == "https" and target.hostname:
        return True
    return bool(target.hostname) and (target.scheme, target.netloc) == (graph.scheme, graph.netloc)


MAX_REDIRECTS = 3
"""Redirects followed by hand for one request, each checked by ``may_fetch``."""
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port (the default one filled in) of a URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or {"https": 443, "http": 80}.get(scheme)


@contextlib.asynccontextmanager
async def _get(
    http: aiohttp.ClientSession, url: str, settings: WhatsAppSettings, timeout: aiohttp.ClientTimeout, what: str
) -> AsyncIterator[aiohttp.ClientResponse]:
    """``GET url`` with the business's token, following up to ``MAX_REDIRECTS`` redirects by
    hand. aiohttp would follow any redirect by itself, past ``may_fetch``: to plain http, to
    an address inside the network. Here every hop must pass ``may_fetch`` (else ``MediaError``),
    and the token goes only to the origin of ``url``, which the caller checked: a hop to
    another origin is asked without it."""
    token_origin = _origin(url)
    for _ in range(MAX_REDIRECTS + 1):
        headers = {"Authorization": f"Bearer {settings.access_token}"} if _origin(url) == token_origin else {}
        async with http.get(url, headers=headers, timeout=timeout, allow_redirects=False) as response:
            if response.status not in _REDIRECT_STATUSES:
                yield response
                return
            location = response.headers.get("Location")
            if not location:
                raise MediaError(f"{what} answered HTTP {response.status} without a Location")
            url = urljoin(str(response.url), location)
        if not may_fetch(url, settings.graph_url):
            raise MediaError(f"{what} redirected to a URL that is not Meta's: {url[:200]}")
    raise MediaError(f"{what} redirected more than {MAX_REDIRECTS} times")


async def download(
    http: aiohttp.ClientSession, settings: WhatsAppSettings, data_dir: Path, media_id: str, mime_type: str | None
) -> str:
    """Fetch one media item into the data folder; its path relative to the data folder.

    An item already on disk is not fetched again. Raises ``MediaError`` when the Graph API
    refuses, the item is larger than ``max_media_bytes``, its bytes do not match the sha256 the
    Graph API gives, or no answer comes within the channel's timeout.
    """
    if not _SAFE.match(media_id):  # it goes into the Graph API's path
        raise MediaError(f"not a media id: {media_id[:100]!r}")
    relative = relative_path(media_id, mime_type)
    target = data_dir / relative
    if target.is_file():
        return relative
    timeout = aiohttp.ClientTimeout(total=settings.timeout)
    limit = settings.max_media_bytes
    try:
        url = f"{settings.graph_url}/{settings.api_version}/{media_id}"
        async with _get(http, url, settings, timeout, f"the media endpoint for {media_id}") as response:
            if response.status != 200:
                raise MediaError(f"media endpoint answered HTTP {response.status} for {media_id}")
            info: Any = await read_provider_json(response)
        if not isinstance(info, dict) or not isinstance(info.get("url"), str):
            raise MediaError(f"media endpoint gave no download URL for {media_id}")
        if not may_fetch(info["url"], settings.graph_url):
            raise MediaError(f"media endpoint gave a download URL that is not Meta's for {media_id}: {info['url'][:200]}")
        size = info.get("file_size")
        if isinstance(size, int) and size > limit:
            raise MediaError(f"media {media_id} has {size} bytes, more than max_media_bytes ({limit})")
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        received = 0
        async with _get(http, info["url"], settings, timeout, f"the download of media {media_id}") as response:
            if response.status != 200:
                raise MediaError(f"media download answered HTTP {response.status} for {media_id}")
            async for chunk in response.content.iter_chunked(64 * 1024):
                received += len(chunk)
                if received > limit:
                    raise MediaError(f"media {media_id} exceeds max_media_bytes ({limit})")
                digest.update(chunk)
                chunks.append(chunk)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        raise MediaError(f"media {media_id} could not be fetched: {type(exc).__name__}: {exc}") from None
    expected = info.get("sha256")
    if isinstance(expected, str) and _HEX64.match(expected) and expected.lower() != digest.hexdigest():
        raise MediaError(f"media {media_id} does not match its sha256")
    # On disk before the message that names it is committed (and the provider hears 200).
    await asyncio.to_thread(write_durably, target, b"".join(chunks))
    return relative


async def attach_downloads(
    http: aiohttp.ClientSession,
    settings: WhatsAppSettings,
    data_dir: Path,
    messages: list[dict[str, Any]],
    log: logging.Logger,
) -> None:
    """Download every attachment of ``messages`` that has a media id, concurrently, and set
    each one's ``path``; failures are logged and leave the attachment as it was."""
    jobs = [
        attachment
        for message in messages
        for attachment in message.get("attachments") or ()
        if isinstance(attachment.get("media_id"), str) and attachment["media_id"]
    ]
    if not jobs:
        return
    results = await asyncio.gather(
        *(download(http, settings, data_dir, a["media_id"], a.get("content_type")) for a in jobs),
        return_exceptions=True,
    )
    for attachment, result in zip(jobs, results, strict=True):
        if isinstance(result, str):
            attachment["path"] = result
        elif isinstance(result, MediaError):
            log.warning("%s", result)
        elif isinstance(result, BaseException):
            log.error("media download failed", exc_info=result)
