from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import default_params
from torch import nn

from wflw_pipeline import train
from wflw_pipeline.core import engine, losses
from wflw_pipeline.core.engine import InferenceError
from wflw_pipeline.core.geometry import View
from wflw_pipeline.core.model import IMAGENET, build_model
from wflw_pipeline.core.runtime import Precision
from wflw_pipeline.data import wflw
from wflw_pipeline.data.dataset import FaceSet, batch_indices, random_faces


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


def _batches(faces, seed: int, batch_size: int, drop_last: bool = True, **ranks) -> engine.EpochBatches:
    order, augmentation = engine.epoch_generators(seed, 0, ranks.get("rank", 0), torch.device("cpu"))
    return engine.EpochBatches(
        faces,
        view=engine.View(48, 1.5, 32),
        augmentation=default_params().augment,
        batch_size=batch_size,
        drop_last=drop_last,
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


def test_epoch_batches_keep_the_short_last_batch_unless_drop_last():
    faces = random_faces(10, 48, 1.5, "cpu")
    kept = _batches(faces, seed=3, batch_size=4, drop_last=False)
    order, _ = engine.epoch_generators(3, 0, 0, torch.device("cpu"))
    permutation = torch.randperm(10, generator=order)
    assert [b.tolist() for b in kept.indices] == [b.tolist() for b in permutation.split(4)]  # 4, 4, 2
    assert [len(x) for x, _ in kept] == [4, 4, 2]
    one_left = random_faces(9, 48, 1.5, "cpu")
    assert len(_batches(one_left, seed=3, batch_size=4, drop_last=False)) == 2
    odd = random_faces(11, 48, 1.5, "cpu")  # 2 global batches of 4, then 3 faces topped up to 4: 2 a rank
    shares = [_batches(odd, seed=0, batch_size=2, drop_last=False, rank=r, world_size=2) for r in (0, 1)]
    assert [[len(b) for b in s.indices] for s in shares] == [[2, 2, 2], [2, 2, 2]]


class _Constant(nn.Module):
    """A 'model' that predicts the same normalised shape for every input."""

    def __init__(self, shape: torch.Tensor) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shape.expand(x.shape[0], *self.shape.shape)


def _random_faces(n: int = 3, size: int = 48) -> FaceSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return FaceSet(
        images,
        torch.zeros(n, 98, 2),
        torch.zeros(n, 6, dtype=torch.bool),
        torch.arange(n),
        np.zeros((n, 2, 3)),
        {"crop_size": size, "context": 1.5},
    )


def _predict(shape: torch.Tensor, flip_test: bool) -> torch.Tensor:
    return engine.predict(
        _Constant(shape),
        _random_faces(),
        view=View(48, 1.5, 32),
        batch_size=2,
        precision=Precision(None, channels_last=False),
        normalize=IMAGENET,
        flip_test=flip_test,
    )


def _to_crop(normalised: torch.Tensor) -> torch.Tensor:
    """Normalised input units -> crop pixels for the plain view: the central 48 / 1.5 = 32 px of the crop."""
    return (normalised - 0.5) * 32 + 24


def test_flip_test_keeps_a_left_right_symmetric_shape():
    shape = torch.rand(98, 2, generator=torch.Generator().manual_seed(1))
    for i, j in enumerate(wflw.FLIP):
        if i < j:
            shape[j] = torch.stack([1 - shape[i, 0], shape[i, 1]])
        elif i == j:
            shape[i, 0] = 0.5
    plain, flipped = _predict(shape, False), _predict(shape, True)
    assert torch.allclose(plain, _to_crop(shape).expand(3, 98, 2), atol=1e-5)
    assert torch.allclose(flipped, plain, atol=1e-5)


def test_flip_test_of_a_constant_asymmetric_shape_averages_it_with_its_mirror():
    shape = torch.rand(98, 2, generator=torch.Generator().manual_seed(2)) * 0.6  # all x left of 0.6
    # The mirrored view's output, un-flipped: point i is point FLIP[i] of the output at x' = 1 - x.
    mirror = shape[list(wflw.FLIP)].clone()
    mirror[:, 0] = 1 - mirror[:, 0]
    expected = _to_crop((shape + mirror) / 2)
    flipped = _predict(shape, True)
    assert torch.allclose(flipped, expected.expand(3, 98, 2), atol=1e-5)
    # e.g. the chin (16, its own mirror) lands at x = 0.5 exactly: the centre line
    assert torch.allclose(flipped[:, wflw.CHIN, 0], torch.tensor(24.0), atol=1e-5)
    assert not torch.allclose(flipped, _predict(shape, False), atol=1e-2)
    # The same by hand, not through wflw.FLIP: every point at the centre (0.5, 0.5) but the outer eye
    # corners, 60 at (0.2, 0.4) and 72 at (0.6, 0.3). The mirror's 60 is its 72 at x' = 1 - 0.6 = 0.4:
    # 60 -> ((0.2 + 0.4) / 2, (0.4 + 0.3) / 2) = (0.3, 0.35), 72 -> ((0.6 + 0.8) / 2, 0.35) = (0.7, 0.35);
    # in crop px, (u - 0.5) * 32 + 24: x 17.6 and 30.4, y 19.2; every other point stays at (24, 24).
    corners = torch.full((98, 2), 0.5)
    corners[60], corners[72] = torch.tensor([0.2, 0.4]), torch.tensor([0.6, 0.3])
    by_hand = torch.full((98, 2), 24.0)
    by_hand[60], by_hand[72] = torch.tensor([17.6, 19.2]), torch.tensor([30.4, 19.2])
    assert torch.allclose(_predict(corners, True), by_hand.expand(3, 98, 2), atol=1e-4)


NO_AUGMENT = replace(
    default_params().augment, flip_prob=0.0, rotation_prob=0.0, shift_prob=0.0, scale_min=1.0, scale_max=1.0
)


def _toy_faces(n: int = 16, size: int = 48) -> FaceSet:
    """Crops with a bright dot at a few random landmark positions, so the points are learnable."""
    generator = torch.Generator().manual_seed(0)
    landmarks = 12 + 24 * torch.rand(n, 98, 2, generator=generator)
    images = torch.full((n, 3, size, size), 30, dtype=torch.uint8)
    for i in range(n):
        for x, y in landmarks[i, ::10].long().tolist():
            images[i, :, y - 1 : y + 2, x - 1 : x + 2] = 255
    crop = {"crop_size": size, "context": 1.5}
    return FaceSet(
        images, landmarks, torch.zeros(n, 6, dtype=torch.bool), torch.arange(n), np.zeros((n, 2, 3)), crop
    )


def test_loss_falls_on_16_faces_within_a_few_steps():
    torch.manual_seed(0)
    faces = _toy_faces()
    view = engine.View(48, 1.5, 32)
    model = build_model("resnet18", "none", train.mean_shape(faces, view))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loss_fn = losses.loss_from_params(default_params().loss, 32)
    epoch_losses = []
    for epoch in range(8):
        order, augmentation = engine.epoch_generators(0, epoch, 0, torch.device("cpu"))
        result = engine.train_one_epoch(
            model,
            optimizer,
            scheduler,
            loss_fn,
            engine.EpochBatches(
                faces,
                view=view,
                augmentation=NO_AUGMENT,
                batch_size=16,
                drop_last=True,
                order_generator=order,
                augment_generator=augmentation,
                precision=Precision(None, channels_last=True),
            ),
            progress=False,
        )
        epoch_losses.append(result.loss)
    assert epoch_losses[-1] < 0.5 * epoch_losses[0], epoch_losses


GRAY = np.full((2, 48, 48, 3), 128, np.uint8)
PIXELS = "crops must be integers in 0..255: found"


def _with(value, dtype, at=(1, 2, 3, 1)) -> np.ndarray:
    crops = GRAY.astype(dtype)
    crops[at] = value
    return crops


def test_uint8_crops_pass_unchanged():
    assert engine.checked_crops(GRAY, 48) is GRAY


@pytest.mark.parametrize("dtype", [np.int64, np.float64, object])
def test_integer_pixels_0_to_255_of_any_dtype_become_uint8(dtype):
    crops = _with(0, dtype)
    crops[0, 0, 0, 0] = 255.0 if dtype is np.float64 else 255
    checked = engine.checked_crops(crops, 48)
    assert checked.dtype == np.uint8
    np.testing.assert_array_equal(checked, crops.astype(np.int64))


@pytest.mark.parametrize(
    ("value", "dtype", "shown"),
    [
        (0.5, np.float64, "0.5"),
        (-0.5, np.float64, "-0.5"),
        (255.5, np.float64, "255.5"),
        (256, np.int64, "256"),
        (-1, np.int64, "-1"),
        (256.0, np.float64, "256.0"),
        (np.nan, np.float64, "nan"),
        (np.inf, np.float64, "inf"),
        (None, object, "None"),
        ("7", object, "'7'"),
        (True, object, "True"),
        (2**70, object, str(2**70)),
    ],
)
def test_a_pixel_not_an_integer_in_0_to_255_is_named_with_its_place(value, dtype, shown):
    with pytest.raises(InferenceError) as caught:
        engine.checked_crops(_with(value, dtype), 48)
    assert str(caught.value) == f"{PIXELS} {shown} at crop 1, row 2, column 3, channel 1"


def test_the_first_bad_pixel_is_the_one_named():
    crops = _with(0.5, np.float64, at=(1, 0, 0, 0))
    crops[0, 47, 47, 2] = 300
    with pytest.raises(InferenceError, match=rf"^{PIXELS} 300.0 at crop 0, row 47, column 47, channel 2$"):
        engine.checked_crops(crops, 48)


@pytest.mark.parametrize(
    ("crops", "dtype"), [(np.ones((1, 48, 48, 3), bool), "bool"), (GRAY.astype(str), "<U3")]
)
def test_booleans_or_strings_are_not_pixels(crops, dtype):
    with pytest.raises(InferenceError) as caught:
        engine.checked_crops(crops, 48)
    assert str(caught.value) == f"{PIXELS} values of dtype {dtype}"


@pytest.mark.parametrize("shape", [(48, 48, 3), (1, 40, 40, 3), (1, 48, 48, 4), (1, 48, 40, 3), (0,)])
def test_a_wrong_shape_is_named(shape):
    with pytest.raises(InferenceError) as caught:
        engine.checked_crops(np.zeros(shape, np.uint8), 48)
    assert str(caught.value) == f"crops must have shape (N, 48, 48, 3): found {shape}"
