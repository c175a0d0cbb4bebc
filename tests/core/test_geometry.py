"""The crop rule and its one warp, worked out by hand."""

import numpy as np
import pytest
from helpers import default_params
from PIL import Image

from wflw_pipeline.core import geometry
from wflw_pipeline.core.geometry import CropRule, face_box, square_box


def test_the_rule_of_convert_is_its_params():
    config = default_params().convert
    assert CropRule.of(config) == CropRule(config.bbox, config.padding, config.context, config.crop_size)


def test_the_crop_matrix_of_a_box_by_hand():
    # region = 40 x 1.25 x 1.5 = 75 px shown in 48: scale 75 / 48 = 1.5625, origin (100, 50) - 37.5
    matrix = CropRule("landmarks", 1.25, 1.5, 48).matrix((100.0, 50.0, 40.0))
    np.testing.assert_array_equal(matrix, [[1.5625, 0.0, 62.5], [0.0, 1.5625, 12.5]])


def test_face_boxes_are_squares_on_the_longer_edge():
    assert square_box(np.array([10.0, 20.0]), np.array([30.0, 60.0])) == (20.0, 40.0, 40.0)
    points = np.array([[10.0, 20.0], [30.0, 60.0], [15.0, 30.0]])
    assert face_box(points, np.array([0, 0, 8, 4]), "landmarks") == (20.0, 40.0, 40.0)
    assert face_box(points, np.array([0, 0, 8, 4]), "rect") == (4.0, 2.0, 8.0)
    expected = "unknown bbox rule 'x': choose one of landmarks, landmarks_ceil, rect"
    with pytest.raises(ValueError, match=f"^{expected}$"):
        face_box(points, np.array([0, 0, 8, 4]), "x")


def test_the_mmpose_box_rounds_the_landmarks_side_up_to_a_whole_pixel_about_the_same_centre():
    points = np.array([[10.25, 20.0], [30.5, 50.1], [15.0, 30.0]])  # extent 20.25 x 30.1
    assert face_box(points, (), "landmarks") == pytest.approx((20.375, 35.05, 30.1))
    assert face_box(points, (), "landmarks_ceil") == pytest.approx((20.375, 35.05, 31.0))
    whole = np.array([[0.0, 0.0], [40.0, 20.0]])
    assert face_box(whole, (), "landmarks_ceil") == face_box(whole, (), "landmarks") == (20.0, 10.0, 40.0)


def test_a_warp_at_scale_one_and_a_whole_pixel_offset_copies_the_pixels():
    pixels = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    rule = CropRule("rect", 1.0, 1.0, 4)
    crop = rule.warp(Image.fromarray(pixels), np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 3.0]]))
    assert crop.size == (4, 4)
    np.testing.assert_array_equal(np.asarray(crop), pixels[3:7, 2:6])


def test_a_warp_that_shrinks_2x_averages_each_2x2_block_first():
    # each 2x2 block holds b, b + 2, b + 4, b + 6: its box average is b + 3 exactly
    blocks = np.array([[0, 40, 80, 120], [20, 60, 100, 140], [10, 50, 90, 130], [30, 70, 110, 150]])
    grey = np.kron(blocks, np.ones((2, 2), int)) + np.tile([[0, 2], [4, 6]], (4, 4))
    pixels = np.repeat(grey[:, :, None], 3, axis=2).astype(np.uint8)
    rule = CropRule("rect", 1.0, 1.0, 4)
    crop = np.asarray(rule.warp(Image.fromarray(pixels), np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])))
    np.testing.assert_array_equal(crop[:, :, 0], blocks + 3)


def test_crop_to_image_applies_each_faces_affine():
    matrices = np.array([[[2.0, 0.0, 10.0], [0.0, 2.0, 20.0]], [[1.0, 0.0, -5.0], [0.0, 1.0, 0.0]]])
    points = np.array([[[1.0, 1.0]], [[3.0, 4.0]]])
    assert geometry.crop_to_image(points, matrices).tolist() == [[[12.0, 22.0]], [[-2.0, 4.0]]]
