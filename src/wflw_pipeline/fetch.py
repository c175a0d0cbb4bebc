"""Stage fetch: generate, download or copy the two WFLW archives, verify them, write a manifest.

`requests` and `gdown` are imported only by the download path, so the synthetic and local sources
run on a machine with the torch stack alone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .data.wflw import ANNOTATIONS_ARCHIVE, IMAGES_ARCHIVE
from .errors import PipelineError, TransientError
from .fileio import atomic_path, sha256_file, write_json
from .params import DataParams, LocalSourceParams, SyntheticParams, WflwSourceParams
from .progress import progress_bar
from .retry import with_backoff

if TYPE_CHECKING:
    import requests

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
GZIP_MAGIC = b"\x1f\x8b"
CHUNK_SIZE = 1 << 16
BACKOFF_BASE_S = 1.0
"""First retry waits this long; each further retry doubles it (up to BACKOFF_MAX_S)."""
BACKOFF_MAX_S = 60.0
DRIVE_HOSTS = frozenset({"drive.google.com"})


class FetchError(PipelineError):
    """A download, archive or checksum problem the user can fix (names the file, URL or key)."""


class DownloadError(FetchError, TransientError):
    """A download that kept failing on network errors: worth retrying later (a TransientError)."""


class _TransientError(Exception):
    """A failed download attempt worth retrying (short read, bad range answer)."""


@dataclasses.dataclass(frozen=True)
class _Archive:
    """One archive to fetch: its output name, its URL or path (params `origin_key`), its pinned SHA-256."""

    name: str
    origin: str
    origin_key: str
    sha256: str | None
    sha_key: str


# ---------------------------------------------------------------- verification


def check_gzip(path: Path, origin: str) -> None:
    """Raise FetchError unless `path` starts with the gzip magic bytes (catches saved HTML error pages)."""
    with path.open("rb") as f:
        head = f.read(64)
    if head[:2] != GZIP_MAGIC:
        hint = " (it looks like an HTML page, e.g. a login, quota or error page)" if b"<" in head else ""
        raise FetchError(f"{path} (from {origin}) is not a gzip archive{hint}; first bytes: {head[:16]!r}")


def verify_archive(path: Path, expected: str | None, sha_key: str, origin: str) -> str:
    """Check `path` is gzip and has the SHA-256 `expected` (when given); return its digest."""
    check_gzip(path, origin)
    actual = sha256_file(path)
    if expected is None:
        logger.warning(
            "%s has SHA-256 %s; no checksum is published, so pin it in params: `%s: %s`",
            path,
            actual,
            sha_key,
            actual,
        )
    elif actual != expected.lower():
        raise FetchError(
            f"{path} (from {origin}): SHA-256 mismatch: expected {expected.lower()} ({sha_key}), got {actual}"
        )
    return actual


# ---------------------------------------------------------------- downloading


def part_path(dest: Path) -> Path:
    """The partial file a download into `dest` grows in (and resumes from)."""
    return dest.with_name(dest.name + ".part")


def is_drive_url(url: str) -> bool:
    return urlparse(url).hostname in DRIVE_HOSTS


def _range_total(response: requests.Response) -> int | None:
    """The full size from a `Content-Range: bytes */<size>` (or `a-b/<size>`) header."""
    _, _, total = response.headers.get("Content-Range", "").rpartition("/")
    return int(total) if total.isdigit() else None


def _stream_to(response: requests.Response, path: Path, offset: int, total: int | None, desc: str) -> int:
    """Append (offset > 0) or write the response body to `path` with a progress bar; return bytes written."""
    written = 0
    with (
        path.open("ab" if offset else "wb") as f,
        progress_bar(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
        ) as bar,
    ):
        for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
            f.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written


def http_download(url: str, dest: Path, timeout_s: float) -> None:
    """One attempt to download `url` into `dest` through `<dest>.part`, resuming with a Range request."""
    import requests

    part = part_path(dest)
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as response:
        if offset and response.status_code == 416:
            if _range_total(response) == offset:
                part.replace(dest)
                return
            part.unlink()
            raise _TransientError(f"partial file {part} is not a prefix of the remote file; restarting")
        response.raise_for_status()
        if offset and response.status_code != 206:
            logger.warning(
                "%s ignored the Range request (HTTP %s); restarting from 0", url, response.status_code
            )
            offset = 0
        elif offset and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            part.unlink()
            raise _TransientError(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
        elif offset:
            logger.info("resuming %s at byte %d", url, offset)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        received = offset + _stream_to(response, part, offset, total, dest.name)
    if total is not None and received != total:  # urllib3 2 raises on a short body itself; 1.x does not
        raise _TransientError(f"connection closed after {received} of {total} bytes")
    part.replace(dest)


def drive_download(url: str, dest: Path, timeout_s: float) -> None:
    """One attempt to download a Google Drive file into `dest` with gdown (it resumes its own part file)."""
    import gdown

    try:
        gdown.download(url, str(dest), quiet=False, resume=True, timeout=timeout_s)
    except gdown.exceptions.FileURLRetrievalError as err:
        raise FetchError(
            f"{url}: Google Drive refused the download ({err}). Download {dest.name} in a browser, then set "
            "data.source=local and data.local.*_archive to the files."
        ) from None
    except gdown.exceptions.DownloadError as err:
        raise _TransientError(str(err)) from err


def _is_transient(error: Exception) -> bool:
    import requests

    if isinstance(error, requests.HTTPError):
        status = error.response.status_code if error.response is not None else 0
        return status >= 500 or status in (408, 429)
    return isinstance(
        error,
        _TransientError
        | requests.ConnectionError
        | requests.Timeout
        | requests.exceptions.ChunkedEncodingError,
    )


def with_retries(attempt: Callable[[], None], url: str, retries: int) -> None:
    """Run `attempt`, retrying transient failures `retries` times with exponential backoff."""
    import requests

    network = (requests.RequestException, _TransientError)

    def warn(err: Exception, retry: int, delay_s: float) -> None:
        logger.warning("%s: %s; retry %d/%d in %.1f s", url, err, retry, retries, delay_s)

    try:
        with_backoff(
            attempt,
            retries + 1,
            BACKOFF_BASE_S,
            BACKOFF_MAX_S,
            retryable=lambda err: isinstance(err, network) and _is_transient(err),
            on_retry=warn,
        )
    except network as err:
        if not _is_transient(err):
            raise FetchError(f"{url}: download failed: {err}") from err
        raise DownloadError(f"{url}: download failed after {retries + 1} attempts: {err}") from err


def download_cached(archive: _Archive, params: WflwSourceParams) -> tuple[Path, str]:
    """Download one archive into the cache (unless complete there), verify it; return its path and digest."""
    cache_dir = Path(params.cache_dir)
    dest = cache_dir / archive.name
    if dest.exists():
        logger.info("%s: using the cached download %s", archive.name, dest)
    else:
        cache_dir.mkdir(parents=True, exist_ok=True)
        download = drive_download if is_drive_url(archive.origin) else http_download
        logger.info("downloading %s from %s", archive.name, archive.origin)
        with_retries(lambda: download(archive.origin, dest, params.timeout_s), archive.origin, params.retries)
    try:
        return dest, verify_archive(dest, archive.sha256, archive.sha_key, archive.origin)
    except FetchError:
        dest.unlink(missing_ok=True)
        logger.error("deleted the bad download %s", dest)
        raise


# ---------------------------------------------------------------- output


def place(src: Path, dest: Path, link: bool) -> None:
    """Atomically make `dest` a copy of `src`, or (`link`) a hard link where the filesystem allows."""
    with atomic_path(dest) as temp:
        temp.unlink()
        try:
            if not link:
                raise OSError("copy requested")
            os.link(src, temp)
        except OSError:
            shutil.copyfile(src, temp)


def _entry(path: Path, digest: str, origin: str) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": digest, "origin": origin}


# ---------------------------------------------------------------- sources


_KINDS = ((IMAGES_ARCHIVE, "images"), (ANNOTATIONS_ARCHIVE, "annotations"))


def _archives(
    params: WflwSourceParams | LocalSourceParams, section: str, origin_field: str
) -> list[_Archive]:
    """The two archives of one params section: `wflw` (`*_url`) or `local` (`*_archive`)."""
    archives = []
    for name, kind in _KINDS:
        key = f"data.{section}.{kind}_{origin_field}"
        origin = getattr(params, f"{kind}_{origin_field}")
        if not origin:
            raise FetchError(f"{key}: must be set when data.source is '{section}'")
        sha256 = getattr(params, f"{kind}_sha256")
        archives.append(_Archive(name, origin, key, sha256, f"data.{section}.{kind}_sha256"))
    return archives


def _place_all(
    verified: list[tuple[_Archive, Path, str]], out_dir: Path, link: bool
) -> dict[str, dict[str, Any]]:
    """Link or copy verified archives into `out_dir`; return their manifest entries."""
    for archive, path, _ in verified:
        place(path, out_dir / archive.name, link)
    return {a.name: _entry(out_dir / a.name, digest, a.origin) for a, _, digest in verified}


def fetch_wflw(params: WflwSourceParams, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Download (or reuse cached) official archives, verify both, then link them into `out_dir`."""
    archives = _archives(params, "wflw", "url")
    return _place_all([(a, *download_cached(a, params)) for a in archives], out_dir, link=True)


def fetch_local(params: LocalSourceParams, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Verify the user's archives, then copy them into `out_dir` (never linked: DVC may protect outputs)."""
    verified = []
    for archive in _archives(params, "local", "archive"):
        path = Path(archive.origin).expanduser()
        if not path.is_file():
            raise FetchError(f"{archive.origin_key}: file not found: {path}")
        verified.append(
            (archive, path, verify_archive(path, archive.sha256, archive.sha_key, archive.origin))
        )
    return _place_all(verified, out_dir, link=False)


def fetch_synthetic(params: SyntheticParams, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Generate the synthetic archives into `out_dir`."""
    from .data.synthetic import generate_archives

    logger.info("generating synthetic WFLW (%d train + %d test faces)", params.train_faces, params.test_faces)
    entries = {}
    for path in generate_archives(out_dir, params):
        check_gzip(path, "synthetic")
        entries[path.name] = _entry(path, sha256_file(path), "synthetic")
    return entries


def run_fetch(params: DataParams, out_dir: Path = Path("data/raw")) -> dict[str, Any]:
    """Stage fetch: put both archives and `manifest.json` into `out_dir`; return the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    if params.source == "synthetic":
        archives = fetch_synthetic(params.synthetic, out_dir)
    elif params.source == "wflw":
        archives = fetch_wflw(params.wflw, out_dir)
    elif params.source == "local":
        archives = fetch_local(params.local, out_dir)
    else:
        raise FetchError(f"data.source: must be synthetic, wflw or local; found {params.source!r}")
    manifest: dict[str, Any] = {"source": params.source, "archives": archives}
    if params.source == "synthetic":
        manifest["synthetic"] = dataclasses.asdict(params.synthetic)
    write_json(out_dir / MANIFEST, manifest)
    logger.info("fetched %s into %s", ", ".join(sorted(archives)), out_dir)
    return manifest
