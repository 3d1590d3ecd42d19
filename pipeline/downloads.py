"""Downloads from URLs (a url source, HellaSwag): fetched once into a cache folder, never left half-written."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from pipeline.errors import UserError
from pipeline.output import ProgressFactory, no_progress

CHUNK = 1 << 20  # bytes per read


def cached_path(url: str, cache_dir: str | Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(urllib.parse.urlparse(url).path).name) or "download"
    return Path(cache_dir) / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def download(url: str, cache_dir: str | Path, progress: ProgressFactory = no_progress) -> Path:
    """The cached copy of url in cache_dir, downloaded on first use; a failed download leaves no file behind."""
    target = cached_path(url, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with open(part, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            length = response.headers.get("Content-Length")
            size = int(length) if length and length.isdigit() else None
            with progress(f"download {target.name[17:]}", size) as advance:
                while chunk := response.read(CHUNK):
                    advance(out.write(chunk))
            if size is not None and out.tell() != size:
                raise http.client.IncompleteRead(b"", size - out.tell())
        os.replace(part, target)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # timeouts and resets are OSErrors
        http_error = isinstance(e, urllib.error.HTTPError)
        reason = f"HTTP {e.code} {e.reason}" if http_error else getattr(e, "reason", None) or repr(e)
        raise UserError(f"could not download {url}: {reason}. Offline? Download it yourself and use "
                        "prepare.source.kind=files with path=...") from None
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return target
