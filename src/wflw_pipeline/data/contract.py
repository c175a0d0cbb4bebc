"""The Parquet data contract (DESIGN.md): the schema of a split file and its file-level metadata.

Other people's tools read these files, so the schema is a public interface; it is written and read here
and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import wflw
from ..errors import PipelineError

FORMAT_VERSION = 1
METADATA_KEY = b"wflw_pipeline"

SCHEMA = pa.schema(
    [
        ("face_id", pa.int64()),
        ("split", pa.string()),
        ("image_path", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("crop_jpeg", pa.binary()),
        ("crop_to_image", pa.list_(pa.float32(), 6)),
        ("landmarks", pa.list_(pa.float32(), 2 * wflw.NUM_POINTS)),
        ("landmarks_image", pa.list_(pa.float32(), 2 * wflw.NUM_POINTS)),
        ("rect", pa.list_(pa.int32(), 4)),
        *[(name, pa.bool_()) for name in wflw.ATTRIBUTES],
    ]
)


class ContractError(PipelineError):
    """A Parquet file that was not written by `wflw convert` (names the file)."""


def write_parquet(rows: list[dict], path: Path, metadata: dict[str, Any], row_group_size: int = 1024) -> None:
    """Write rows sorted by face_id with the contract schema and file-level metadata."""
    rows = sorted(rows, key=lambda row: row["face_id"])
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(metadata).encode()})
    columns = {name: [row[name] for row in rows] for name in SCHEMA.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A split that is missing or not a readable Parquet file as one ContractError naming it."""
    if not Path(path).is_file():
        raise ContractError(f"{path}: Parquet split not found (run `wflw convert` first)")
    try:
        yield
    except (pa.ArrowException, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ContractError(
            f"{path}: not a readable Parquet file ({reason}): run `wflw convert` again "
            "(with DVC: `dvc repro -f convert`)"
        ) from None


def read_split(path: Path, columns: list[str] | None = None) -> pa.Table:
    """The rows of a split file (`columns` only, when given)."""
    with _reading(path):
        return pq.read_table(path, columns=columns)


def read_metadata(path: Path) -> dict[str, Any]:
    """The pipeline's file-level metadata of a Parquet file written by convert."""
    with _reading(path):
        meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise ContractError(f"{path}: no {METADATA_KEY.decode()} metadata: not written by `wflw convert`")
    return json.loads(meta[METADATA_KEY])


def data_identity(path: Path) -> dict[str, Any]:
    """What identifies the data a split came from: source, archive SHA-256s and crop parameters."""
    meta = read_metadata(path)
    return {"source": meta.get("source"), "archives": meta.get("archives"), "crop": meta.get("crop")}
