"""The preview grid: size, labelled rows, landmark dots in their group's colour."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from paths import PARAMS_YAML
from PIL import Image

from wflw_pipeline import cli
from wflw_pipeline.data import preview, wflw

CROP = 64


def _crop_jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (CROP, CROP), (shade, shade, shade)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _landmarks(seed: int) -> np.ndarray:
    """98 points on a 14 x 7 grid, 4 px apart (8 px in the preview), in a random order."""
    grid = np.stack(np.meshgrid(np.arange(14), np.arange(7)), axis=-1).reshape(-1, 2) * 4.0 + 6.0
    return np.random.default_rng(seed).permutation(grid).astype(np.float32)


def _write_parquet(path, flags: list[dict[str, bool]]) -> list[np.ndarray]:
    points = [_landmarks(i) for i in range(len(flags))]
    landmarks = pa.FixedSizeListArray.from_arrays(
        pa.array(np.concatenate([p.reshape(-1) for p in points]), pa.float32()), 2 * wflw.NUM_POINTS
    )
    columns = {"crop_jpeg": pa.array([_crop_jpeg(60 + 20 * i) for i in range(len(flags))], pa.binary())}
    columns["landmarks"] = landmarks
    for attribute in wflw.ATTRIBUTES:
        columns[attribute] = pa.array([f.get(attribute, False) for f in flags], pa.bool_())
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return points


def test_preview_grid_has_one_row_per_subset_and_coloured_landmarks(tmp_path):
    flags = [{}, {"pose": True}, {"pose": True, "blur": True}, {"occlusion": True}, {}]
    points = _write_parquet(tmp_path / "test.parquet", flags)
    out = tmp_path / "nested" / "preview.png"

    preview.write_preview(tmp_path / "test.parquet", out, per_row=3, seed=1)

    image = Image.open(out).convert("RGB")
    assert image.size == (preview.LABEL_WIDTH + 3 * preview.CELL, len(preview.ROWS) * preview.CELL)
    pixels = np.asarray(image)
    scale = preview.CELL / CROP
    # row "none" holds faces 0 and 4 in index order; row "pose" faces 1 and 2; row "blur" face 2
    for row, column, face in ((0, 0, 0), (0, 1, 4), (1, 1, 2), (6, 0, 2)):
        for group, indices in wflw.POINT_GROUPS.items():
            x, y = np.floor(points[face][indices[0]] * scale).astype(int)
            pixel = pixels[row * preview.CELL + y, preview.LABEL_WIDTH + column * preview.CELL + x]
            assert tuple(pixel) == preview.GROUP_COLOURS[group], (row, column, group)
    makeup = slice(
        preview.ROWS.index("makeup") * preview.CELL, (preview.ROWS.index("makeup") + 1) * preview.CELL
    )
    assert (pixels[makeup, preview.LABEL_WIDTH :] == preview.BACKGROUND).all()  # no make-up faces: empty row
    label = pixels[makeup, : preview.LABEL_WIDTH]
    assert (label != preview.BACKGROUND).any()  # ...but labelled
    assert sorted(p.name for p in out.parent.iterdir()) == ["preview.png"]  # no temp file left


def test_preview_sampling_is_seeded(tmp_path):
    _write_parquet(tmp_path / "test.parquet", [{} for _ in range(6)])
    paths = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (0, 0, 1), strict=True):
        preview.write_preview(tmp_path / "test.parquet", path, per_row=2, seed=seed)
    first, again, other = (np.asarray(Image.open(p)) for p in paths)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_a_missing_split_is_one_line_and_exit_2(tmp_path, caplog):
    missing = tmp_path / "nonexistent.parquet"

    args = ["preview", "--parquet", str(missing), "--out", str(tmp_path / "p.png"), "--params", str(PARAMS_YAML)]
    code = cli.main(args)

    assert code == 2
    assert f"{missing}: Parquet split not found (run `wflw convert` first)" in caplog.text
    assert list(tmp_path.iterdir()) == []
