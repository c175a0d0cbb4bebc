"""Stage fetch against a real loopback HTTP server (Range, dropped connections, ignored ranges)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import random
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import default_params

from wflw_pipeline import fetch
from wflw_pipeline.data.wflw import ANNOTATIONS_ARCHIVE, IMAGES_ARCHIVE, annotation_member
from wflw_pipeline.fetch import FetchError, run_fetch
from wflw_pipeline.params import DataParams, SyntheticParams


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


IMAGES = _tar_gz({"WFLW_images/0--Parade/a.jpg": random.Random(0).randbytes(300_000)})
ANNOTATIONS = _tar_gz({annotation_member("train"): b"1 2 3\n", annotation_member("test"): b"4 5 6\n"})
FILES = {IMAGES_ARCHIVE: IMAGES, ANNOTATIONS_ARCHIVE: ANNOTATIONS}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves `server.files` with Range support; can drop connections or ignore Range on demand."""

    server: _Server

    def do_GET(self) -> None:
        state = self.server
        with state.lock:
            state.requests.append((self.path.lstrip("/"), self.headers.get("Range")))
            drop = state.drops > 0
            state.drops -= drop
        data = state.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not state.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: state.drop_after] if drop else body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


class _Server(ThreadingHTTPServer):
    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        self.drops = 0
        """The next `drops` responses close the connection after `drop_after` body bytes."""
        self.drop_after = 100_000
        self.ignore_range = False

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def requested(self, name: str) -> list[str | None]:
        """The Range header of each request for `name`."""
        return [rng for path, rng in self.requests if path == name]


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(FILES)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "BACKOFF_BASE_S", 0.0)


def _wflw(server: _Server, tmp_path: Path, **overrides: object) -> DataParams:
    source = {
        "images_url": server.url(IMAGES_ARCHIVE),
        "annotations_url": server.url(ANNOTATIONS_ARCHIVE),
        "cache_dir": str(tmp_path / "cache"),
        "retries": 2,
        "timeout_s": 5.0,
        **overrides,
    }
    data = default_params().data
    return replace(data, source="wflw", wflw=replace(data.wflw, **source))


def _pinned(server: _Server, tmp_path: Path, **overrides: object) -> DataParams:
    return _wflw(
        server, tmp_path, images_sha256=_sha(IMAGES), annotations_sha256=_sha(ANNOTATIONS), **overrides
    )


def _assert_outputs(out: Path) -> dict:
    assert (out / IMAGES_ARCHIVE).read_bytes() == IMAGES
    assert (out / ANNOTATIONS_ARCHIVE).read_bytes() == ANNOTATIONS
    return json.loads((out / "manifest.json").read_text())


def test_fresh_download_writes_archives_manifest_and_cache(
    server: _Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "raw"
    with caplog.at_level(logging.WARNING, logger="wflw_pipeline.fetch"):
        returned = run_fetch(_wflw(server, tmp_path), out)

    manifest = _assert_outputs(out)
    assert manifest == returned
    assert manifest["source"] == "wflw"
    assert manifest["archives"][IMAGES_ARCHIVE] == {
        "bytes": len(IMAGES),
        "sha256": _sha(IMAGES),
        "origin": server.url(IMAGES_ARCHIVE),
    }
    assert manifest["archives"][ANNOTATIONS_ARCHIVE]["sha256"] == _sha(ANNOTATIONS)
    assert sorted(p.name for p in out.iterdir()) == sorted([*FILES, "manifest.json"])
    cache = tmp_path / "cache"
    assert sorted(p.name for p in cache.iterdir()) == sorted(FILES)
    assert (out / IMAGES_ARCHIVE).stat().st_ino == (cache / IMAGES_ARCHIVE).stat().st_ino
    assert server.requested(IMAGES_ARCHIVE) == [None]
    assert f"data.wflw.images_sha256: {_sha(IMAGES)}" in caplog.text
    assert f"data.wflw.annotations_sha256: {_sha(ANNOTATIONS)}" in caplog.text


def test_partial_download_resumes_with_range(server: _Server, tmp_path: Path) -> None:
    half = len(IMAGES) // 2
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{IMAGES_ARCHIVE}.part").write_bytes(IMAGES[:half])

    run_fetch(_pinned(server, tmp_path), tmp_path / "raw")

    _assert_outputs(tmp_path / "raw")

    assert server.requested(IMAGES_ARCHIVE) == [f"bytes={half}-"]
    assert not (tmp_path / "cache" / f"{IMAGES_ARCHIVE}.part").exists()


def test_dropped_connection_is_retried_and_resumed(server: _Server, tmp_path: Path) -> None:
    server.drops = 1

    run_fetch(_pinned(server, tmp_path), tmp_path / "raw")

    _assert_outputs(tmp_path / "raw")
    first, second = server.requested(IMAGES_ARCHIVE)
    assert first is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second or "").group(1))  # type: ignore[union-attr]
    assert 0 < resumed_at <= server.drop_after


def test_exhausted_retries_keep_the_part_for_later_and_write_no_output(
    server: _Server, tmp_path: Path
) -> None:
    server.drops = 2
    out = tmp_path / "raw"

    with pytest.raises(FetchError, match=r"WFLW_images\.tar\.gz: download failed after 2 attempts") as err:
        run_fetch(_pinned(server, tmp_path, retries=1), out)

    assert err.value.exit_code == 75  # transient: `wflw fetch` exits 75, which the Prefect flow retries

    assert len(server.requested(IMAGES_ARCHIVE)) == 2
    assert (tmp_path / "cache" / f"{IMAGES_ARCHIVE}.part").stat().st_size > 0
    assert list(out.iterdir()) == []


def test_checksum_mismatch_is_refused_and_the_download_deleted(server: _Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    out = tmp_path / "raw"

    with pytest.raises(FetchError) as err:
        run_fetch(_wflw(server, tmp_path, images_sha256=wrong), out)

    message = str(err.value)
    assert IMAGES_ARCHIVE in message and wrong in message and _sha(IMAGES) in message
    assert "data.wflw.images_sha256" in message
    assert not hasattr(err.value, "exit_code")  # not transient: exit code 2, no retry
    assert not (out / IMAGES_ARCHIVE).exists()
    assert not (out / "manifest.json").exists()
    assert not (tmp_path / "cache" / IMAGES_ARCHIVE).exists()


def test_cached_complete_download_is_not_fetched_again(server: _Server, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, data in FILES.items():
        (cache / name).write_bytes(data)

    manifest = run_fetch(_pinned(server, tmp_path), tmp_path / "raw")

    assert server.requests == []
    assert _assert_outputs(tmp_path / "raw") == manifest
    assert manifest["archives"][IMAGES_ARCHIVE]["origin"] == server.url(IMAGES_ARCHIVE)


def test_server_ignoring_range_restarts_from_zero(server: _Server, tmp_path: Path) -> None:
    server.ignore_range = True
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{IMAGES_ARCHIVE}.part").write_bytes(IMAGES[:1000])

    run_fetch(_pinned(server, tmp_path), tmp_path / "raw")

    assert server.requested(IMAGES_ARCHIVE) == ["bytes=1000-"]
    _assert_outputs(tmp_path / "raw")


def test_complete_part_answered_416_is_accepted(server: _Server, tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / f"{IMAGES_ARCHIVE}.part").write_bytes(IMAGES)

    run_fetch(_pinned(server, tmp_path), tmp_path / "raw")

    assert server.requested(IMAGES_ARCHIVE) == [f"bytes={len(IMAGES)}-"]
    _assert_outputs(tmp_path / "raw")


def test_html_error_page_is_refused_and_not_cached(server: _Server, tmp_path: Path) -> None:
    server.files[ANNOTATIONS_ARCHIVE] = b"<!DOCTYPE html><html>Quota exceeded</html>"

    with pytest.raises(FetchError, match=r"WFLW_annotations\.tar\.gz.*not a gzip archive.*HTML"):
        run_fetch(_wflw(server, tmp_path), tmp_path / "raw")

    assert not (tmp_path / "cache" / ANNOTATIONS_ARCHIVE).exists()
    assert not (tmp_path / "raw" / ANNOTATIONS_ARCHIVE).exists()


def test_http_404_fails_at_once_naming_the_url(server: _Server, tmp_path: Path) -> None:
    missing = server.url("nope.tar.gz")

    with pytest.raises(FetchError, match=re.escape(missing)):
        run_fetch(_wflw(server, tmp_path, annotations_url=missing), tmp_path / "raw")

    assert len(server.requested("nope.tar.gz")) == 1


def test_drive_url_goes_through_gdown_with_shared_retry(
    monkeypatch: pytest.MonkeyPatch, server: _Server, tmp_path: Path
) -> None:
    import gdown

    calls: list[dict] = []

    def fake_download(url: str, output: str, **kwargs: object) -> str:
        calls.append({"url": url, **kwargs})
        if len(calls) == 1:
            raise gdown.exceptions.DownloadError("Download is incomplete")
        Path(output).write_bytes(IMAGES)
        return output

    monkeypatch.setattr(gdown, "download", fake_download)
    drive = "https://drive.google.com/uc?id=1hzBd48JIdWTJSsATBEB_eFVvPL1bx6UC"

    manifest = run_fetch(_pinned(server, tmp_path, images_url=drive), tmp_path / "raw")

    _assert_outputs(tmp_path / "raw")
    assert [c["url"] for c in calls] == [drive, drive]
    assert all(c["resume"] is True for c in calls)
    assert manifest["archives"][IMAGES_ARCHIVE]["origin"] == drive
    assert server.requested(IMAGES_ARCHIVE) == []


def test_drive_refusal_is_not_retried_and_suggests_local(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import gdown

    calls = []

    def refuse(url: str, output: str, **kwargs: object) -> str:
        calls.append(url)
        raise gdown.exceptions.FileURLRetrievalError("Too many users have viewed or downloaded this file")

    monkeypatch.setattr(gdown, "download", refuse)
    data = default_params().data  # the official images_url: Google Drive
    params = replace(data, source="wflw", wflw=replace(data.wflw, cache_dir=str(tmp_path / "cache")))

    with pytest.raises(FetchError, match=r"drive\.google\.com.*data\.source=local"):
        run_fetch(params, tmp_path / "raw")

    assert len(calls) == 1


def _local_params(tmp_path: Path, **overrides: object) -> DataParams:
    for name, data in FILES.items():
        (tmp_path / "mine").mkdir(exist_ok=True)
        (tmp_path / "mine" / name).write_bytes(data)
    local = {
        "images_archive": f"mine/{IMAGES_ARCHIVE}",
        "annotations_archive": f"mine/{ANNOTATIONS_ARCHIVE}",
        **overrides,
    }
    data = default_params().data
    return replace(data, source="local", local=replace(data.local, **local))


def test_local_archives_are_verified_and_placed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    params = _local_params(tmp_path, images_sha256=_sha(IMAGES))

    manifest = run_fetch(params, Path("raw"))

    assert _assert_outputs(tmp_path / "raw") == manifest
    assert manifest["source"] == "local"
    assert manifest["archives"][IMAGES_ARCHIVE] == {
        "bytes": len(IMAGES),
        "sha256": _sha(IMAGES),
        "origin": f"mine/{IMAGES_ARCHIVE}",
    }
    assert (tmp_path / "raw" / IMAGES_ARCHIVE).stat().st_nlink == 1, "the user's file must be copied"


def test_local_missing_archive_names_the_key_and_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    params = _local_params(tmp_path, annotations_archive="elsewhere/ann.tar.gz")

    with pytest.raises(FetchError, match=r"data\.local\.annotations_archive: file not found: elsewhere/ann"):
        run_fetch(params, Path("raw"))

    assert not (tmp_path / "raw" / IMAGES_ARCHIVE).exists()


def test_local_checksum_mismatch_keeps_the_users_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    params = _local_params(tmp_path, annotations_sha256="f" * 64)

    with pytest.raises(FetchError, match=r"data\.local\.annotations_sha256"):
        run_fetch(params, Path("raw"))

    assert (tmp_path / "mine" / ANNOTATIONS_ARCHIVE).read_bytes() == ANNOTATIONS
    assert not (tmp_path / "raw" / ANNOTATIONS_ARCHIVE).exists()


def test_synthetic_source_writes_both_archives_and_manifest(tmp_path: Path) -> None:
    synthetic = SyntheticParams(
        seed=3, train_faces=2, test_faces=1, min_image_size=64, max_image_size=96, workers=1
    )
    out = tmp_path / "raw"

    manifest = run_fetch(replace(default_params().data, source="synthetic", synthetic=synthetic), out)

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "synthetic"
    assert manifest["synthetic"]["seed"] == 3 and manifest["synthetic"]["train_faces"] == 2
    for name in FILES:
        data = (out / name).read_bytes()
        assert gzip.decompress(data)
        assert manifest["archives"][name] == {"bytes": len(data), "sha256": _sha(data), "origin": "synthetic"}
    with tarfile.open(out / ANNOTATIONS_ARCHIVE) as tar:
        assert annotation_member("train") in tar.getnames()
