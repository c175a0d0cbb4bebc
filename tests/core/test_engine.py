import numpy as np
import torch
from helpers import default_params

from wflw_pipeline.core import engine
from wflw_pipeline.core.runtime import Precision
from wflw_pipeline.data.dataset import batch_indices, random_faces


def test_epoch_batches_move_to_the_device_in_one_piece_and_keep_their_order():
    batches = [torch.tensor([3, 1]), torch.tensor([0, 2]), torch.tensor([4])]
    moved = engine._on_device(iter(batches), torch.device("cpu"))
    assert [b.tolist() for b in moved] == [[3, 1], [0, 2], [4]]
    assert engine._on_device(iter([]), torch.device("cpu")) == []


def test_only_a_cpu_batch_of_the_same_size_is_reused():
    previous = torch.zeros(4, 3, 8, 8)
    assert engine.reusable(previous, 4) is previous
    assert engine.reusable(previous, 3) is None
    assert engine.reusable(None, 4) is None
    assert engine.reusable(torch.zeros(4, 3, 8, 8, device="meta"), 4) is None


def _batches(faces, seed: int, batch_size: int, **ranks) -> engine.EpochBatches:
    order, augmentation = engine.epoch_generators(seed, 0, ranks.get("rank", 0), torch.device("cpu"))
    return engine.EpochBatches(
        faces,
        view=engine.View(48, 1.5, 32),
        augmentation=default_params().augment,
        batch_size=batch_size,
        order_generator=order,
        augment_generator=augmentation,
        precision=Precision(None, True),
        **ranks,
    )


def test_epoch_batches_are_the_shuffled_full_batches_augmented_in_order():
    faces = random_faces(10, 48, 1.5, "cpu")
    batches = _batches(faces, seed=3, batch_size=4)
    order, _ = engine.epoch_generators(3, 0, 0, torch.device("cpu"))
    expected = list(batch_indices(10, 4, shuffle=True, generator=order, drop_last=True))
    assert len(batches) == 2 and [b.tolist() for b in batches.indices] == [b.tolist() for b in expected]
    seen = [(inputs.clone(), targets) for inputs, targets in batches]
    assert [x.shape for x, _ in seen] == [(4, 3, 32, 32)] * 2 and seen[0][1].shape == (4, 98, 2)
    again = [(inputs.clone(), targets) for inputs, targets in _batches(faces, seed=3, batch_size=4)]
    assert all(torch.equal(x, y) and torch.equal(t, u) for (x, t), (y, u) in zip(seen, again, strict=True))
    assert not torch.equal(seen[0][0], seen[1][0])


def test_epoch_batches_give_each_rank_its_share_and_keep_a_short_set_whole():
    faces = random_faces(8, 48, 1.5, "cpu")
    shares = [_batches(faces, seed=0, batch_size=2, rank=r, world_size=2).indices for r in (0, 1)]
    together = np.sort(np.concatenate([torch.cat(s).numpy() for s in shares]))
    assert [len(s) for s in shares] == [2, 2] and together.tolist() == list(range(8))
    assert len(_batches(random_faces(3, 48, 1.5, "cpu"), seed=0, batch_size=4)) == 1  # fewer than a batch
