import dataclasses
import math

import pytest
import torch

from wflw_pipeline.core import engine
from wflw_pipeline.data import augment, wflw

CROP, CONTEXT = 48, 1.5
VIEW, OFFSET = 32, 8  # the central CROP / CONTEXT square starts at (CROP - VIEW) / 2
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def random_params(batch: int, seed: int = 0) -> augment.ViewParams:
    return augment.draw_params(batch, generator=torch.Generator().manual_seed(seed), device="cpu")


def flipped_identity(batch: int) -> augment.ViewParams:
    return dataclasses.replace(
        augment.identity_params(batch, "cpu"), flip=torch.ones(batch, dtype=torch.bool)
    )


def blob_images(points: torch.Tensor, size: int, sigma: float = 1.5) -> torch.Tensor:
    """uint8 (B, 3, size, size): one Gaussian blob per sample, centred on points (B, 2) (continuous)."""
    centres = torch.arange(size) + 0.5
    dx = centres.view(1, 1, -1) - points[:, 0].view(-1, 1, 1)
    dy = centres.view(1, -1, 1) - points[:, 1].view(-1, 1, 1)
    blob = 255 * torch.exp(-(dx**2 + dy**2) / (2 * sigma**2))
    return blob.round().to(torch.uint8).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def centroid(images: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centre (B, 2) of channel 0, in continuous pixel coordinates."""
    weights = images[:, 0].clamp(min=0)
    centres = torch.arange(images.shape[-1], dtype=torch.float32) + 0.5
    total = weights.sum(dim=(1, 2))
    x = (weights.sum(dim=1) * centres).sum(dim=1) / total
    y = (weights.sum(dim=2) * centres).sum(dim=1) / total
    return torch.stack([x, y], dim=1)


def test_truncated_normal_quantiles_and_range():
    uniform = torch.tensor([0.0, 0.5, 0.9999999])
    assert augment.truncated_normal(uniform).tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)


def test_drawn_params_follow_mmpose_distributions():
    params = random_params(20000)
    assert params.scale.min() >= 0.75 and params.scale.max() <= 1.25
    # std of a standard normal truncated to [-1, 1] is sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)) = 0.5396
    assert params.scale.std().item() == pytest.approx(0.25 * 0.5396, abs=0.003)
    assert params.angle.abs().max() <= math.radians(60) + 1e-6
    assert (params.angle != 0).float().mean().item() == pytest.approx(0.6, abs=0.015)
    shifted = (params.shift != 0).any(dim=1)
    assert shifted.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert params.shift.abs().max() <= 0.16 + 1e-6
    assert params.flip.float().mean().item() == pytest.approx(0.5, abs=0.015)


def test_draw_params_is_deterministic_for_a_seed():
    first, again, other = random_params(64, seed=3), random_params(64, seed=3), random_params(64, seed=4)
    for name in ("flip", "scale", "angle", "shift"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.scale, other.scale)


def test_landmarks_round_trip_through_the_view_matrices():
    params = random_params(16)
    matrices = augment.view_matrices(params, CROP, CONTEXT, out_size=64)
    output_points = torch.rand(16, 98, 2, generator=torch.Generator().manual_seed(1)) * 64
    crop_points = augment.apply_affine(matrices, output_points)
    no_flip = torch.zeros(16, dtype=torch.bool)
    back = augment.transform_landmarks(crop_points, matrices, no_flip)
    assert (back - output_points).abs().max() < 1e-3


def test_identity_view_is_the_central_square():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, CROP, CROP), dtype=torch.uint8, generator=generator)
    matrices = augment.view_matrices(augment.identity_params(2, "cpu"), CROP, CONTEXT, VIEW)
    out = augment.warp(images, matrices, VIEW, ZERO, ONE)
    central = images[:, :, OFFSET : OFFSET + VIEW, OFFSET : OFFSET + VIEW].float()
    assert torch.allclose(out, central, atol=1e-3)


def test_identity_dot_lands_where_the_landmark_goes():
    out_size = 64
    crop_point = torch.tensor([[19.5, 27.5]])  # the centre of crop pixel (19, 27)
    images = torch.zeros(1, 3, CROP, CROP, dtype=torch.uint8)
    images[0, :, 27, 19] = 255
    landmarks = crop_point.view(1, 1, 2).expand(1, 98, 2)
    inputs, targets = augment.augment_batch(
        images,
        landmarks,
        params=augment.identity_params(1, "cpu"),
        crop_size=CROP,
        context=CONTEXT,
        out_size=out_size,
        mean=ZERO,
        std=ONE,
    )
    expected = (crop_point - OFFSET) * out_size / VIEW
    assert torch.allclose(targets[:, 0] * out_size, expected, atol=1e-4)
    assert (centroid(inputs) - expected).abs().max() < 0.5


def test_augmented_blob_centre_matches_transformed_landmark():
    batch, out_size = 8, 32
    params = random_params(batch, seed=5)
    generator = torch.Generator().manual_seed(2)
    points = CROP / 2 + (torch.rand(batch, 2, generator=generator) - 0.5) * 12
    landmarks = points.unsqueeze(1).expand(batch, 98, 2)
    inputs, targets = augment.augment_batch(
        blob_images(points, CROP),
        landmarks,
        params=params,
        crop_size=CROP,
        context=CONTEXT,
        out_size=out_size,
        mean=ZERO,
        std=ONE,
    )
    assert (centroid(inputs) - targets[:, 0] * out_size).abs().max() < 0.5


def test_flipping_twice_is_the_identity():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, CROP, CROP), dtype=torch.uint8, generator=generator)
    landmarks = torch.rand(2, 98, 2, generator=generator) * CROP
    params = flipped_identity(2)
    matrices = augment.view_matrices(params, CROP, 1.0, CROP)
    once = augment.warp(images, matrices, CROP, ZERO, ONE)
    assert torch.allclose(once, images.flip(-1).float(), atol=1e-3)
    twice = augment.warp(once.round().to(torch.uint8), matrices, CROP, ZERO, ONE)
    assert torch.allclose(twice, images.float(), atol=1e-3)
    flipped = augment.transform_landmarks(landmarks, matrices, params.flip)
    assert torch.allclose(flipped[:, wflw.FLIP, 0], CROP - landmarks[..., 0], atol=1e-4)
    back = augment.transform_landmarks(flipped, matrices, params.flip)
    assert torch.allclose(back, landmarks, atol=1e-4)


def test_flipped_points_land_on_mirrored_pixels_and_are_permuted():
    landmarks = torch.full((1, 98, 2), 24.0)
    dots = {60: (14.0, 20.0), 72: (33.0, 21.0), 54: (25.0, 30.0), 96: (17.0, 19.0)}
    images = torch.zeros(1, 3, CROP, CROP, dtype=torch.uint8)
    for index, (x, y) in dots.items():
        landmarks[0, index] = torch.tensor([x, y])
        images[0, :, int(y) - 1 : int(y) + 1, int(x) - 1 : int(x) + 1] = 255  # 2x2 px centred on (x, y)
    params = flipped_identity(1)
    inputs, targets = augment.augment_batch(
        images, landmarks, params=params, crop_size=CROP, context=CONTEXT, out_size=VIEW, mean=ZERO, std=ONE
    )
    points = targets[0] * VIEW
    for index in dots:
        x, y = points[wflw.FLIP[index]].round().long().tolist()
        assert (inputs[0, :, y - 1 : y + 1, x - 1 : x + 1] == 255).all(), index
    assert points[wflw.LEFT_EYE_OUTER, 0] < points[wflw.RIGHT_EYE_OUTER, 0]


def test_warp_normalises_and_supports_channels_last():
    images = torch.full((1, 3, CROP, CROP), 200, dtype=torch.uint8)
    matrices = augment.view_matrices(augment.identity_params(1, "cpu"), CROP, CONTEXT, 16)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    out = augment.warp(images, matrices, 16, mean, std, memory_format=torch.channels_last)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    # by hand: 76.325 / 58.395 = 1.30705, 83.72 / 57.12 = 1.46569, 96.47 / 57.375 = 1.68139
    assert out[0, :, 8, 8].tolist() == pytest.approx([1.30705, 1.46569, 1.68139], abs=1e-4)


def test_warp_pads_outside_the_crop_with_black():
    images = torch.full((1, 3, CROP, CROP), 255, dtype=torch.uint8)
    params = dataclasses.replace(augment.identity_params(1, "cpu"), scale=torch.full((1,), 2.0))
    out = augment.warp(images, augment.view_matrices(params, CROP, CONTEXT, 16), 16, ZERO, ONE)
    assert out[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert out[0, :, 8, 8].tolist() == [255.0, 255.0, 255.0]


def test_augment_batch_rejects_a_wrong_crop_size():
    images = torch.zeros(1, 3, 40, 40, dtype=torch.uint8)
    with pytest.raises(ValueError, match="crop_size 48"):
        augment.augment_batch(
            images,
            torch.zeros(1, 98, 2),
            params=augment.identity_params(1, "cpu"),
            crop_size=CROP,
            context=CONTEXT,
            out_size=32,
            mean=ZERO,
            std=ONE,
        )


def test_positive_angle_shows_the_face_turned_counter_clockwise():
    params = dataclasses.replace(augment.identity_params(1, "cpu"), angle=torch.full((1,), math.pi / 2))
    matrices = augment.view_matrices(params, CROP, CONTEXT, VIEW)
    below_centre = torch.tensor([[[CROP / 2, CROP / 2 + 8]]]).expand(1, 98, 2)
    points = augment.transform_landmarks(below_centre, matrices, params.flip)
    assert points[0, 0].tolist() == pytest.approx([VIEW / 2 + 8, VIEW / 2], abs=1e-4)


# The performance changes to augment.py and engine.py keep their results: checked against the plain forms.


def _plain_warp(images, matrices, out_size, mean, std):
    """augment.warp as one affine_grid + grid_sample over the whole batch, then (x - mean) / std."""
    theta = augment._grid_theta(matrices.float(), tuple(images.shape[-1:-3:-1]), out_size)
    grid = torch.nn.functional.affine_grid(theta, [len(images), 3, out_size, out_size], align_corners=False)
    sampled = torch.nn.functional.grid_sample(images.float(), grid, align_corners=False)
    return (sampled - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("batch", [1, 5, 9])
def test_chunked_warp_with_index_and_out_matches_the_plain_form(batch):
    generator = torch.Generator().manual_seed(batch)
    images = torch.randint(0, 256, (12, 3, 40, 40), dtype=torch.uint8, generator=generator)
    index = torch.randint(0, 12, (batch,), generator=generator)
    params = augment.draw_params(batch, generator=generator, device="cpu")
    matrices = augment.view_matrices(params, 40, 1.5, 24)
    mean, std = engine.IMAGENET.mean, engine.IMAGENET.std
    expected = _plain_warp(images[index], matrices, 24, mean, std)
    plain = augment.warp(images[index], matrices, 24, mean, std)
    assert torch.allclose(plain, expected, atol=1e-4)
    out = torch.full((batch, 3, 24, 24), float("nan")).contiguous(memory_format=torch.channels_last)
    written = augment.warp(images, matrices, 24, mean, std, torch.channels_last, out=out, index=index)
    assert written is out and written.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(written, plain)
    with pytest.raises(ValueError, match="out must be float32"):
        augment.warp(images[index], matrices, 24, mean, std, out=torch.empty(batch, 3, 23, 24))


def test_affine_grid_equals_torch_affine_grid():
    theta = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))
    for size in (1, 7, 64):
        expected = torch.nn.functional.affine_grid(theta, [6, 3, size, size], align_corners=False)
        assert torch.allclose(augment._affine_grid(theta, size), expected, atol=1e-6)


def test_augment_batch_with_index_equals_indexing_first():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 48, 48), dtype=torch.uint8, generator=generator)
    landmarks = 12 + 24 * torch.rand(6, 98, 2, generator=generator)
    index = torch.tensor([4, 0, 4, 2])
    params = augment.draw_params(4, generator=generator, device="cpu")
    options = {"params": params, "crop_size": 48, "context": 1.5, "out_size": 32, "mean": (1, 2, 3)}
    options["std"] = (4, 5, 6)
    lazy = augment.augment_batch(images, landmarks, index=index, **options)
    eager = augment.augment_batch(images[index], landmarks[index], **options)
    assert torch.equal(lazy[0], eager[0]) and torch.equal(lazy[1], eager[1])


def test_small_constants_are_made_once_per_device():
    first = augment.flip_permutation("cpu")
    assert first is augment.flip_permutation(torch.device("cpu"))
    # What it holds, checked against WFLW.md's table of the 98 points rather than against wflw.FLIP:
    assert first.dtype == torch.long and torch.equal(first[first], torch.arange(98))  # an involution
    assert first[:33].tolist() == list(range(32, -1, -1))  # contour: temple to temple, reversed
    assert sorted(first[60:68].tolist()) == list(range(68, 76))  # image-left eye onto image-right eye
    assert (first[60].item(), first[64].item()) == (72, 68)  # outer corner to outer, inner to inner
    centre_line = [16, 51, 52, 53, 54, 57, 79, 85, 90, 94]  # chin, nose bridge and centre, lip centres
    assert first[centre_line].tolist() == centre_line
    assert first[[76, 88, 96]].tolist() == [82, 92, 97]  # lip corners and pupils swap sides
