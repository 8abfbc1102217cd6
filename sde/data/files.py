"""Data files: MD5 checks and downloads that never leave a partial file behind."""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Python >= 3.11 location; annotations only
    from importlib.resources.abc import Traversable

#: ``fetch(url, destination, timeout_s)`` writes the body of ``url`` to ``destination``.
Fetch = Callable[[str, Path, float], None]

_logger = logging.getLogger(__name__)

#: Socket timeout of every download request; a few seconds so offline runs fail fast.
DOWNLOAD_TIMEOUT_S = 5.0


_MD5_CHUNK_BYTES = 1 << 20


def file_md5(path: Path | Traversable) -> str:
    """Hex MD5 of a file, read in chunks (the CIFAR-10 archive is 163 MiB)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        while chunk := stream.read(_MD5_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_md5(actual_md5: str, source: str, expected_md5: str | None) -> None:
    if expected_md5 is not None and actual_md5 != expected_md5:
        raise ValueError(f"{source}: MD5 {actual_md5} does not match the published {expected_md5}; "
                         "the file is corrupt or not the expected one (delete it to re-download)")


def fetch_url(url: str, destination: Path, timeout_s: float) -> None:
    """Download ``url`` into ``destination`` (the default ``Fetch``; tests replace it)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response, open(destination, "wb") as out:
        shutil.copyfileobj(response, out)


def download_file(destination: Path, urls: Sequence[str], expected_md5: str | None, fetch: Fetch) -> str | None:
    """Fetch ``destination`` from the first of ``urls`` that works; None or why all failed.

    Each attempt writes a temporary file next to ``destination``, checks its MD5 and only
    then renames it into place, so an interrupted or bad download never leaves a file
    that a later run would take for the real one.
    """
    failures = []
    created = not destination.parent.exists()
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return f"cannot create {destination.parent}: {err}"
    for url in urls:
        handle, temp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
        os.close(handle)
        temp_path = Path(temp_name)
        try:
            _logger.debug("downloading %s", url)
            fetch(url, temp_path, DOWNLOAD_TIMEOUT_S)
            check_md5(file_md5(temp_path), url, expected_md5)
            os.replace(temp_path, destination)
            return None
        except (OSError, http.client.HTTPException, ValueError) as err:
            failures.append(f"{url}: {err}")
        finally:
            temp_path.unlink(missing_ok=True)
    if created and not any(destination.parent.iterdir()):
        destination.parent.rmdir()  # a failed download leaves no empty folder behind
    return "; ".join(failures)
