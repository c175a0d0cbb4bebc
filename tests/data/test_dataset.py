"""data/dataset.py: a Parquet split decoded once into tensors, and the batch index streams of an epoch."""

from pathlib import Path

import numpy as np
import pytest
import torch
from contract_rows import contract_row, crop_jpeg
from helpers import tiny_parquet

from wflw_pipeline.data import contract
from wflw_pipeline.data.contract import ContractError
from wflw_pipeline.data.dataset import DatasetError, batch_indices, iters_per_epoch, load_faces, random_faces


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    return tiny_parquet(tmp_path_factory.mktemp("data"), test=3)


def test_data_loads_once_as_uint8_on_the_device(parquet_dir):
    faces = load_faces(parquet_dir / "train.parquet")
    assert faces.images.dtype == torch.uint8 and faces.images.shape[1:] == (3, 48, 48)
    assert faces.landmarks.shape == (len(faces), 98, 2)
    assert faces.crop_size == 48 and faces.context == 1.5


def _split(path: Path, crop_size: int, *rows: dict) -> Path:
    crop = {"bbox": "landmarks", "padding": 1.25, "context": 1.5, "crop_size": crop_size}
    contract.write_parquet(list(rows), path, {"format_version": 1, "source": "synthetic", "crop": crop})
    return path


def test_a_split_of_two_hand_made_faces_loads_field_by_field(tmp_path):
    points = np.stack([np.arange(98) / 4, 1 + np.arange(98) / 2], axis=1)  # (i / 4, 1 + i / 2)
    path = _split(
        tmp_path / "test.parquet",
        16,
        contract_row(9, crop_jpeg((0, 0, 0), 16), points + 1, flags=(True, False, False, False, False, True)),
        contract_row(4, crop_jpeg((200, 100, 50), 16), points, matrix=(2.0, 0.0, 10.5, 0.0, 2.0, -4.0)),
    )
    faces = load_faces(path, threads=2)
    assert len(faces) == 2 and faces.face_id.tolist() == [4, 9]  # rows sorted by face_id
    assert (faces.crop_size, faces.context) == (16, 1.5)
    assert faces.images.shape == (2, 3, 16, 16) and faces.images.dtype == torch.uint8
    # channels first: the colour (200, 100, 50) of face 4 is in images[0, c] (JPEG: within a few levels)
    assert (faces.images[0].float().mean(dim=(1, 2)) - torch.tensor([200.0, 100.0, 50.0])).abs().max() < 3
    assert faces.images[1].max().item() <= 3
    assert faces.landmarks.dtype == torch.float32 and faces.landmarks.shape == (2, 98, 2)
    assert faces.landmarks[0, :3].tolist() == [[0.0, 1.0], [0.25, 1.5], [0.5, 2.0]]  # (x, y) of points 0-2
    assert faces.landmarks[1, 97].tolist() == [1 + 97 / 4, 2 + 97 / 2]
    assert faces.flags.tolist() == [[False] * 6, [True, False, False, False, False, True]]
    assert faces.crop_to_image.dtype == np.float64
    assert faces.crop_to_image[0].tolist() == [[2.0, 0.0, 10.5], [0.0, 2.0, -4.0]]
    assert faces.crop_to_image[1].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_a_missing_split_or_a_crop_of_another_size_is_a_dataset_error(tmp_path):
    with pytest.raises(ContractError, match=r"missing.parquet: Parquet split not found \(run `wflw convert`"):
        load_faces(tmp_path / "missing.parquet")
    points = np.zeros((98, 2))
    path = _split(tmp_path / "test.parquet", 16, contract_row(0, crop_jpeg((0, 0, 0), 8), points))
    with pytest.raises(DatasetError, match=r"test.parquet: crop of row 0 is \(8, 8\), metadata says 16"):
        load_faces(path)


def test_batch_indices_in_order_with_and_without_the_short_last_batch():
    assert [b.tolist() for b in batch_indices(7, 3, shuffle=False)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b.tolist() for b in batch_indices(7, 3, shuffle=False, drop_last=True)] == [[0, 1, 2], [3, 4, 5]]
    assert [b.tolist() for b in batch_indices(6, 3, shuffle=False, drop_last=True)] == [[0, 1, 2], [3, 4, 5]]
    assert list(batch_indices(2, 3, shuffle=False, drop_last=True)) == []


def test_batch_indices_give_each_rank_every_world_sizeth_face_of_each_global_batch():
    # batch 2 per rank, 2 ranks: global batches [0, 1, 2, 3] and [4, 5, 6]
    shares = [[b.tolist() for b in batch_indices(7, 2, shuffle=False, rank=r, world_size=2)] for r in (0, 1)]
    assert shares == [[[0, 2], [4, 6]], [[1, 3], [5, 0]]]  # the short [4, 5, 6] topped up with face 0
    dropped = [
        [b.tolist() for b in batch_indices(7, 2, shuffle=False, drop_last=True, rank=r, world_size=2)]
        for r in (0, 1)
    ]
    assert dropped == [[[0, 2]], [[1, 3]]]
    # 5 faces, batch 2 on 4 ranks: one short global batch, topped up with faces 0-2 to 8: 2 faces each
    assert [
        [b.tolist() for b in batch_indices(5, 2, shuffle=False, rank=r, world_size=4)] for r in range(4)
    ] == [
        [[0, 4]],
        [[1, 0]],
        [[2, 1]],
        [[3, 2]],
    ]
    # every rank takes as many steps as the others: rank 3 of 4 gets face 0 again, not nothing
    assert [b.tolist() for b in batch_indices(3, 1, shuffle=False, rank=3, world_size=4)] == [[0]]


def test_shuffled_batch_indices_are_the_generators_permutation_in_batches():
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    batches = list(batch_indices(10, 4, shuffle=True, generator=torch.Generator().manual_seed(5)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), expected)
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_random_faces_have_a_splits_shapes_with_points_inside_the_central_view():
    faces = random_faces(5, 48, 1.5, "cpu")
    assert len(faces) == 5 and (faces.crop_size, faces.context) == (48, 1.5)
    assert faces.images.shape == (5, 3, 48, 48) and faces.images.dtype == torch.uint8
    assert faces.landmarks.shape == (5, 98, 2) and faces.flags.shape == (5, 6) and not faces.flags.any()
    # the central 48 / 1.5 = 32 px square: 8 <= x, y < 40
    assert faces.landmarks.min().item() >= 8 and faces.landmarks.max().item() < 40
    assert faces.crop_to_image.shape == (5, 2, 3) and (faces.crop_to_image[:, :, :2] == np.eye(2)).all()
    again = random_faces(5, 48, 1.5, "cpu")  # from seed 0 each time
    assert torch.equal(faces.images, again.images) and torch.equal(faces.landmarks, again.landmarks)


def test_iters_per_epoch_counts_full_global_batches_and_the_short_one_unless_dropped():
    assert iters_per_epoch(7500, 512) == 14  # 7,500 = 14 x 512 + 332
    assert iters_per_epoch(7500, 512, drop_last=False) == 15  # MMPose: the 332 make a 15th step
    assert iters_per_epoch(7500, 64, world_size=8, drop_last=False) == 15
    assert iters_per_epoch(1024, 512) == iters_per_epoch(1024, 512, drop_last=False) == 2
    assert iters_per_epoch(100, 512) == iters_per_epoch(100, 512, drop_last=False) == 1


def test_a_short_batch_of_one_face_per_process_is_dropped_even_when_kept():
    assert iters_per_epoch(513, 512, drop_last=False) == 1  # 1 face left over
    assert iters_per_epoch(514, 512, drop_last=False) == 2
    assert iters_per_epoch(8 * 64 + 8, 64, world_size=8, drop_last=False) == 1  # 8 left: 1 a process
    assert iters_per_epoch(8 * 64 + 9, 64, world_size=8, drop_last=False) == 2  # 9 left, topped up
