"""data/contract.py: the Parquet schema and metadata a split file is written and read with."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from contract_rows import contract_row, crop_jpeg

from wflw_pipeline.data import contract

METADATA = {
    "format_version": contract.FORMAT_VERSION,
    "source": "synthetic",
    "archives": {"annotations.tar.gz": "ab" * 32, "images.tar.gz": "cd" * 32},
    "crop": {"bbox": "landmarks", "padding": 1.25, "context": 1.5, "crop_size": 8, "jpeg_quality": 95},
}


def _landmarks(offset: float) -> np.ndarray:
    """98 points, point i at (offset + i / 4, offset + i / 2): exact in float32."""
    i = np.arange(98, dtype=np.float64)
    return np.stack([offset + i / 4, offset + i / 2], axis=1)


def test_a_written_split_reads_back_sorted_with_the_schema_and_metadata(tmp_path):
    path = tmp_path / "test.parquet"
    rows = [
        contract_row(
            7, crop_jpeg((200, 100, 50), 8), _landmarks(2.0), flags=(True, False, False, False, False, True)
        ),
        contract_row(3, crop_jpeg((0, 0, 0), 8), _landmarks(1.0), matrix=(2.0, 0.0, 10.5, 0.0, 2.0, -4.0)),
        contract_row(5, crop_jpeg((9, 9, 9), 8), _landmarks(0.5)),
    ]
    contract.write_parquet(rows, path, METADATA, row_group_size=2)

    assert pq.read_schema(path).remove_metadata() == contract.SCHEMA
    assert pq.ParquetFile(path).metadata.num_row_groups == 2  # 3 rows in groups of 2
    table = pq.read_table(path).to_pydict()
    assert table["face_id"] == [3, 5, 7]  # sorted by face_id, not in the order given
    assert table["crop_to_image"][0] == [2.0, 0.0, 10.5, 0.0, 2.0, -4.0]
    assert table["landmarks"][2][:4] == [2.0, 2.0, 2.25, 2.5]  # x0, y0, x1, y1 of face 7
    assert (table["pose"], table["blur"], table["makeup"]) == (
        [False, False, True],
        [False, False, True],
        [False] * 3,
    )
    assert table["crop_jpeg"][2] == rows[0]["crop_jpeg"]
    assert contract.read_metadata(path) == METADATA
    assert contract.data_identity(path) == {
        "source": "synthetic",
        "archives": METADATA["archives"],
        "crop": METADATA["crop"],
    }


def test_a_row_that_breaks_the_schema_is_refused(tmp_path):
    row = contract_row(1, crop_jpeg((0, 0, 0), 8), _landmarks(0.0)[:68])  # 68 points, not 98
    with pytest.raises(pa.ArrowInvalid):
        contract.write_parquet([row], tmp_path / "bad.parquet", METADATA)


def test_a_parquet_file_not_written_by_convert_is_a_contract_error(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"face_id": [1, 2]}), path)
    with pytest.raises(
        contract.ContractError, match=r"other.parquet: no wflw_pipeline metadata: not written by"
    ):
        contract.read_metadata(path)
    with pytest.raises(contract.ContractError):
        contract.data_identity(path)


def test_a_missing_or_truncated_split_is_one_line_naming_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "train.parquet"
    with pytest.raises(contract.ContractError) as missing:
        contract.read_split(path)
    assert str(missing.value) == f"{path}: Parquet split not found (run `wflw convert` first)"

    contract.write_parquet([contract_row(0, crop_jpeg((1, 2, 3), 8), _landmarks(0.0))], path, METADATA)
    path.write_bytes(path.read_bytes()[:200])  # truncated, as a full disk or a killed copy leaves it
    for read in (contract.read_split, contract.read_metadata):
        with pytest.raises(contract.ContractError) as truncated:
            read(path)
        message = str(truncated.value)
        assert message.startswith(f"{path}: not a readable Parquet file (")
        assert message.endswith("): run `wflw convert` again (with DVC: `dvc repro -f convert`)")
        assert "\n" not in message
