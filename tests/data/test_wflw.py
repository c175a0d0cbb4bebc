import numpy as np
import pytest

from wflw_pipeline.data import wflw


def _annotation(seed: int = 0) -> wflw.Annotation:
    rng = np.random.default_rng(seed)
    landmarks = np.round(rng.uniform(0, 900, size=(98, 2)), 6)
    flags = tuple(bool(b) for b in rng.integers(0, 2, size=6))
    return wflw.Annotation(landmarks, (10, 20, 300, 400), flags, "12--Group/12_Group_synthetic_3.jpg")


def test_flip_is_an_involution_that_swaps_the_eye_corners():
    flip = np.array(wflw.FLIP)
    assert sorted(wflw.FLIP) == list(range(98))
    assert (flip[flip] == np.arange(98)).all()
    assert flip[wflw.LEFT_EYE_OUTER] == wflw.RIGHT_EYE_OUTER
    assert flip[wflw.CHIN] == wflw.CHIN
    assert (flip[96], flip[97]) == (97, 96)


def test_point_groups_cover_the_98_points_once():
    indices = [i for group in wflw.POINT_GROUPS.values() for i in group]
    assert sorted(indices) == list(range(98))


@pytest.mark.parametrize("seed", range(5))
def test_format_then_parse_round_trips(seed):
    original = _annotation(seed)
    line = wflw.format_line(original)
    assert len(line.split()) == 207
    parsed = wflw.parse_line(line)
    np.testing.assert_allclose(parsed.landmarks, original.landmarks, atol=1e-6)
    assert parsed.rect == original.rect
    assert parsed.attributes == original.attributes
    assert parsed.image_path == original.image_path
    assert wflw.format_line(parsed) == line


def test_flag_reads_the_attribute_in_file_order():
    line = wflw.format_line(_annotation()).split()
    line[196 + 4 : 196 + 10] = ["0", "0", "1", "0", "0", "1"]
    parsed = wflw.parse_line(" ".join(line))
    assert [a for a in wflw.ATTRIBUTES if parsed.flag(a)] == ["illumination", "blur"]


def _with_token(index: int, value: str) -> str:
    tokens = wflw.format_line(_annotation()).split()
    tokens[index] = value
    return " ".join(tokens)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (" ".join(wflw.format_line(_annotation()).split()[:-2]), "expected 207 tokens, found 205"),
        (_with_token(7, "abc"), "coordinate 7 is not a number: 'abc'"),
        (_with_token(3, "nan"), "coordinate 3 is not finite: 'nan'"),
        (_with_token(0, "inf"), "coordinate 0 is not finite"),
        (_with_token(197, "2.5"), "rect value 1 is not an integer: '2.5'"),
        (_with_token(201, "2"), "flag expression must be 0 or 1, found '2'"),
        (_with_token(206, "/etc/passwd.jpg"), "image path: unsafe path '/etc/passwd.jpg'"),
        (_with_token(206, "a/../../b.jpg"), "image path: unsafe path"),
    ],
)
def test_parse_rejects_bad_lines_with_a_clear_message(line, message):
    with pytest.raises(wflw.AnnotationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        wflw.parse_line(line)


def test_test_list_line_has_coordinates_then_path():
    tokens = wflw.format_test_list_line(_annotation()).split()
    assert len(tokens) == 197
    assert tokens[-1].endswith(".jpg")


def test_member_names_follow_the_archive_layout():
    assert wflw.annotation_member("train") == (
        "WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_train.txt"
    )
    assert wflw.test_list_member("pose") == "WFLW_annotations/list_98pt_test/list_98pt_test_largepose.txt"
    assert wflw.test_list_member() == "WFLW_annotations/list_98pt_test/list_98pt_test.txt"
