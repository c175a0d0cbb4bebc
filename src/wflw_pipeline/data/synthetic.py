"""Synthetic WFLW: faces on the 98-point layout, rendered with PIL and written as WFLW's two archives.

A face is a 3D mean-face model (identity jitter, head pose, expression) projected
orthographically. The contour is the silhouette of the face's front half, so it stays on the
drawn edge under yaw. Each face is drawn on its own patch (small faces at 2x, then box-filtered
down), so the landmarks lie on the drawn features. The six flags are drawn independently per face
with WFLW's test-split proportions; an effect is applied exactly when its flag is set, sized
relative to the face.
Faces are built and drawn in continuous pixels and their annotation lines written in WFLW's convention
(README, "Coordinates"), so a synthetic face takes exactly the path of a real one.
"""

from __future__ import annotations

import colorsys
import contextlib
import functools
import gzip
import io
import logging
import math
import multiprocessing
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from . import wflw
from ..fileio import atomic_path
from ..params import SyntheticParams
from ..progress import progress_bar

logger = logging.getLogger(__name__)

FLAG_RATES: dict[str, float] = {
    "pose": 326 / 2500,
    "expression": 314 / 2500,
    "illumination": 698 / 2500,
    "makeup": 206 / 2500,
    "occlusion": 736 / 2500,
    "blur": 773 / 2500,
}
"""Probability of each flag: its share of WFLW's 2,500 test faces."""

FACES_PER_IMAGE_P = (0.66, 0.21, 0.08, 0.05)
"""P(1, 2, 3, 4 faces on an image): mean 1.52, like WFLW's 10,000 faces in 6,551 images."""

EVENTS: tuple[str, ...] = (
    "0--Parade", "1--Handshaking", "2--Demonstration", "3--Riot", "4--Dancing", "5--Car_Accident",
    "6--Funeral", "7--Cheering", "8--Election_Campain", "9--Press_Conference", "10--People_Marching",
    "11--Meeting", "12--Group", "13--Interview", "14--Traffic", "15--Stock_Market", "16--Award_Ceremony",
    "17--Ceremony", "18--Concerts", "19--Couple", "20--Family_Group", "21--Festival", "22--Picnic",
    "23--Shoppers", "24--Soldier_Firing", "25--Soldier_Patrol", "26--Soldier_Drilling", "27--Spa",
    "28--Sports_Fan", "29--Students_Schoolkids", "30--Surgeons", "31--Waiter_Waitress",
    "32--Worker_Laborer", "33--Running", "34--Baseball", "35--Basketball", "36--Football", "37--Soccer",
    "38--Tennis", "39--Ice_Skating", "40--Gymnastics", "41--Swimming", "42--Car_Racing", "43--Row_Boat",
    "44--Aerobics", "45--Balloonist", "46--Jockey", "47--Matador_Bullfighter",
    "48--Parachutist_Paratrooper", "49--Greeting", "50--Celebration_Or_Party", "51--Dresses",
    "52--Photographers", "53--Raid", "54--Rescue", "55--Sports_Coach_Trainer", "56--Voter", "57--Angler",
    "58--Hockey", "59--people--driving--car", "60--Street_Battle",
)  # fmt: skip
"""WIDER FACE's event folders, which WFLW's images keep."""

SUPERSAMPLE_BELOW_PX = 128
"""Faces whose patch is smaller than this are drawn at 2x and box-filtered down (anti-aliasing)."""
JPEG_QUALITY = 90
IMAGES_COMPRESSLEVEL = 0
ANNOTATIONS_COMPRESSLEVEL = 6
TAR_MTIME = 1_514_764_800  # 2018-01-01, fixed so that the archives are reproducible
MIN_FACE_PX = 48
OCCLUDED_POINTS = (17, 37)
"""An occluder hides this many of the 98 points (17%..38%)."""

# Face model, in face units: x right, y down, z towards the camera; eyes at y = 0, the face's
# half-width ~1, its front at z = 0.
Y_TEMPLE = -0.15
Y_TOP = -1.5
Y_CROWN = -0.1  # where the skull is widest

# Independent random streams per face, so that toggling one flag changes only its effect.
IDENTITY, POSE, EXPRESSION, LIGHT, MAKEUP, OCCLUSION, BLUR, RECT = range(8)

_LEFT_FEATURES = (*range(33, 42), *range(55, 57), *range(60, 68), 76, 77, 78, 86, 87, 88, 89, 95, 96)
"""Points built on the image-left half of the template; their FLIP partners are mirrored."""

SKIN_TONES = (
    (245, 210, 185), (232, 190, 160), (215, 168, 135), (195, 145, 110),
    (168, 118, 85), (140, 95, 65), (110, 72, 50), (85, 56, 40),
)  # fmt: skip
HAIR_COLOURS = ((25, 20, 18), (55, 38, 28), (105, 72, 45), (200, 165, 105), (150, 70, 40), (165, 165, 165))
IRIS_COLOURS = ((95, 60, 35), (50, 32, 22), (70, 110, 160), (80, 120, 70), (110, 120, 130), (130, 100, 50))


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class ImageJob:
    """One image to render: its name, split, and the flags of its faces (drawn when planning)."""

    seed: int
    split: str
    split_index: int
    image_index: int
    relpath: str
    flags: tuple[tuple[bool, ...], ...]
    min_size: int
    max_size: int


@dataclass(frozen=True)
class Pose:
    """Head rotation in degrees: yaw (about the vertical axis), pitch (nodding), roll (in-plane)."""

    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True)
class Expression:
    """Displacements in face units: mouth opening, smile (0..1), brow raise."""

    mouth_open: float
    smile: float
    brow_raise: float


@dataclass(frozen=True)
class Shape:
    """Identity: the proportions of one face, in face units."""

    width: float
    depth: float
    chin: float
    jaw: float
    eye_x: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    gaze: tuple[float, float]
    brow_y: float
    brow_thick: float
    brow_arch: float
    nose_len: float
    nose_w: float
    nose_height: float
    mouth_y: float
    mouth_w: float
    upper_lip: float
    lower_lip: float
    hairline: float
    hair: str


@dataclass(frozen=True)
class Look:
    """Colours of one face; make-up replaces the natural lips and adds shadow, liner, blush."""

    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    brow: tuple[int, int, int]
    iris: tuple[int, int, int]
    sclera: tuple[int, int, int]
    lips: tuple[int, int, int]
    clothes: tuple[int, int, int]
    eye_shadow: tuple[int, int, int, int] | None
    blush: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Light:
    """Lambertian light on an ellipsoid: shade = ambient + diffuse * max(0, n . direction)."""

    direction: tuple[float, float, float]
    ambient: float
    diffuse: float
    colour: tuple[float, float, float]


@dataclass(frozen=True)
class Face:
    """Everything sampled for one face, before it is placed on the image."""

    flags: tuple[bool, ...]
    pose: Pose
    expression: Expression
    shape: Shape
    look: Look
    light: Light
    blur: float
    rng_occlusion: np.random.Generator
    rng_rect: np.random.Generator


def _uniform_abs(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high) * rng.choice((-1.0, 1.0)))


def sample_pose(rng: np.random.Generator, large: bool) -> Pose:
    """A near-frontal pose (|yaw| <= 20, |pitch|, |roll| <= 12), or a large one."""
    if not large:
        return Pose(rng.uniform(-20, 20), rng.uniform(-12, 12), rng.uniform(-12, 12))
    kind = rng.choice(("yaw", "yaw", "yaw", "roll", "pitch"))
    if kind == "yaw":
        return Pose(_uniform_abs(rng, 40, 70), rng.uniform(-15, 15), rng.uniform(-15, 15))
    if kind == "roll":
        return Pose(rng.uniform(-25, 25), rng.uniform(-12, 12), _uniform_abs(rng, 30, 60))
    return Pose(rng.uniform(-25, 25), _uniform_abs(rng, 25, 35), rng.uniform(-12, 12))


def sample_expression(rng: np.random.Generator, strong: bool) -> Expression:
    """A neutral face, or one or two of: open mouth, smile, raised brows."""
    if not strong:
        return Expression(rng.uniform(0, 0.012), rng.uniform(0, 0.12), rng.uniform(-0.01, 0.02))
    kinds = ("open", "smile", "brows", "open+brows", "smile+brows")[rng.integers(5)]
    mouth = rng.uniform(0.18, 0.42) if "open" in kinds else 0.0
    smile = rng.uniform(0.6, 1.0) if "smile" in kinds else rng.uniform(0, 0.1)
    if "smile" in kinds:
        mouth = rng.uniform(0.03, 0.1)
    brows = rng.uniform(0.09, 0.16) if "brows" in kinds else rng.uniform(-0.01, 0.02)
    return Expression(mouth, smile, brows)


def _sample_shape(rng: np.random.Generator) -> Shape:
    u = rng.uniform
    nose_len = u(0.48, 0.6)
    mouth_y = nose_len + 0.07 + u(0.24, 0.32)
    return Shape(
        width=u(0.93, 1.05),
        depth=u(1.1, 1.3),
        chin=mouth_y + u(0.4, 0.52),
        jaw=u(2.2, 3.4),
        eye_x=u(0.38, 0.44),
        eye_w=u(0.15, 0.19),
        eye_h=u(0.055, 0.075),
        eye_tilt=u(-0.01, 0.035),
        gaze=(u(-1, 1), u(-1, 1)),
        brow_y=u(-0.32, -0.26),
        brow_thick=u(0.05, 0.09),
        brow_arch=u(0.02, 0.07),
        nose_len=nose_len,
        nose_w=u(0.13, 0.19),
        nose_height=u(0.3, 0.42),
        mouth_y=mouth_y,
        mouth_w=u(0.3, 0.4),
        upper_lip=u(0.05, 0.09),
        lower_lip=u(0.07, 0.12),
        hairline=u(-0.95, -0.65),
        hair=("short", "short", "short", "long", "long", "bald")[rng.integers(6)],
    )


def _jitter(rng: np.random.Generator, colour: tuple[int, ...], amount: float) -> tuple[int, int, int]:
    values = np.clip(np.asarray(colour[:3], float) * rng.uniform(1 - amount, 1 + amount, 3), 0, 255)
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _sample_look(rng: np.random.Generator, rng_makeup: np.random.Generator, makeup: bool) -> Look:
    skin = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 0.05)
    hair = _jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 0.1)
    brow = tuple(int(min(h * 0.8, s * 0.5)) for h, s in zip(hair, skin, strict=True))
    natural_lips = tuple(int(c * f) for c, f in zip(skin, (0.85, 0.6, 0.6), strict=True))
    common = {
        "skin": skin,
        "hair": hair,
        "brow": brow,
        "iris": _jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 0.1),
        "sclera": _jitter(rng, (238, 234, 228), 0.04),
        "clothes": tuple(int(v) for v in rng.integers(20, 235, 3)),
    }
    if not makeup:
        return Look(lips=natural_lips, eye_shadow=None, blush=None, **common)  # type: ignore[arg-type]
    u = rng_makeup.uniform
    lips = _hsv((0.0, 0.97, 0.93, 0.88, 0.02)[rng_makeup.integers(5)], u(0.75, 1.0), u(0.55, 0.9))
    shadow = _hsv((0.6, 0.75, 0.35, 0.1, 0.9, 0.05)[rng_makeup.integers(6)], u(0.55, 0.9), u(0.4, 0.8))
    blush = (230, 90, 110, int(u(70, 110))) if u() < 0.6 else None
    return Look(lips=lips, eye_shadow=(*shadow, int(u(170, 220))), blush=blush, **common)  # type: ignore[arg-type]


def _sample_light(rng: np.random.Generator, extreme: bool) -> Light:
    """Soft light from the front-top, or an extreme one: side light, low light, light from below."""
    u = rng.uniform
    if not extreme:
        direction = (u(-0.4, 0.4), u(-0.5, -0.1), 1.0)
        return Light(direction, u(0.55, 0.65), u(0.38, 0.45), (1.0, u(0.96, 1.0), u(0.93, 1.0)))
    kind = rng.integers(3)
    if kind == 0:
        direction = (float(rng.choice((-1.0, 1.0))), u(-0.3, 0.3), u(0.1, 0.3))
        return Light(direction, u(0.05, 0.14), u(0.95, 1.1), (1.0, u(0.85, 1.0), u(0.7, 1.0)))
    if kind == 1:
        cast = ((1.0, 0.78, 0.55), (0.6, 0.75, 1.0), (0.8, 0.8, 0.8))[rng.integers(3)]
        return Light((u(-0.3, 0.3), u(-0.3, 0.3), 1.0), u(0.18, 0.28), u(0.08, 0.14), cast)
    return Light(
        (u(-0.3, 0.3), 1.0, u(0.2, 0.4)), u(0.06, 0.14), u(0.95, 1.1), (1.0, u(0.8, 1.0), u(0.6, 0.9))
    )


def face_rng(job: ImageJob, face_index: int, stream: int) -> np.random.Generator:
    """The random stream `stream` of one face of one image."""
    return np.random.default_rng([job.seed, job.split_index, job.image_index, face_index, stream])


def sample_face(job: ImageJob, face_index: int) -> Face:
    """Draw one face of `job`: identity, colours and each flag's effect from its own stream."""
    flags = dict(zip(wflw.ATTRIBUTES, job.flags[face_index], strict=True))
    identity = face_rng(job, face_index, IDENTITY)
    blur = face_rng(job, face_index, BLUR).uniform(0.03, 0.08) if flags["blur"] else 0.0
    return Face(
        flags=job.flags[face_index],
        pose=sample_pose(face_rng(job, face_index, POSE), flags["pose"]),
        expression=sample_expression(face_rng(job, face_index, EXPRESSION), flags["expression"]),
        shape=_sample_shape(identity),
        look=_sample_look(identity, face_rng(job, face_index, MAKEUP), flags["makeup"]),
        light=_sample_light(face_rng(job, face_index, LIGHT), flags["illumination"]),
        blur=blur,
        rng_occlusion=face_rng(job, face_index, OCCLUSION),
        rng_rect=face_rng(job, face_index, RECT),
    )


# ---------------------------------------------------------------------------------------------
# Geometry: a 3D face in face units, projected


def _half_width(s: Shape, y: np.ndarray) -> np.ndarray:
    """Half-width of the face at height y: a superellipse jaw below the temples, a dome above."""
    up = np.clip((Y_TEMPLE - y) / (Y_TEMPLE - Y_TOP), 0, 1)
    down = np.clip((y - Y_TEMPLE) / (s.chin - Y_TEMPLE), 0, 1) ** (s.jaw / 2)
    jaw = np.sqrt(1 - down**2) ** (2 / s.jaw)
    return s.width * np.where(y < Y_TEMPLE, np.sqrt(1 - up**2), jaw)


def _depth(s: Shape, half_width: np.ndarray) -> np.ndarray:
    return s.depth * np.maximum(half_width, 0.3)


def _surface_z(s: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Depth of the face's surface: each height's cross-section is an ellipse with its front at z=0."""
    a = np.maximum(_half_width(s, y), 1e-6)
    c = _depth(s, a)
    return -c + c * np.sqrt(np.clip(1 - (x / a) ** 2, 0, 1))


def _silhouette(
    a: np.ndarray, c: np.ndarray, y: np.ndarray, centre: np.ndarray, yaw: float, side: int, front: bool
) -> np.ndarray:
    """The points of the cross-sections (x = a cos t, z = centre + c sin t) extreme in image x.

    `side` -1 takes the image-left extreme, +1 the right; `front` keeps t in [0, pi] (the face's
    front half: past it the contour stays at the ear line, as annotators place it).
    """
    t = np.arctan2(math.sin(yaw) * c, math.cos(yaw) * a) + (math.pi if side < 0 else 0.0)
    if front:
        t = np.clip(t, 0, math.pi)
    return np.stack([a * np.cos(t), y, centre + c * np.sin(t)], axis=1)


def _jaw_outline(s: Shape) -> tuple[np.ndarray, np.ndarray]:
    """Half-widths and heights of contour points 0..16 (temple to chin), evenly spaced along the jaw."""
    y = np.linspace(Y_TEMPLE, s.chin, 200)
    x = _half_width(s, y)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    at = np.linspace(0, arc[-1], 17)
    return np.interp(at, arc, x), np.interp(at, arc, y)


def _brow(s: Shape, e: Expression, t: np.ndarray, side: int) -> np.ndarray:
    """Left-brow edge points at fractions t from the outer (0) to the inner (1) end."""
    outer, inner = -s.eye_x - s.eye_w - 0.08, -0.13
    centre = s.brow_y - s.brow_arch * np.clip(1 - ((t - 0.4) / 0.6) ** 2, 0, None)
    centre = centre - e.brow_raise * (0.7 + 0.5 * t)
    thick = s.brow_thick * (0.3 + 0.7 * np.sqrt(t))
    return np.stack([outer + (inner - outer) * t, centre + side * thick / 2], axis=1)


def _eye(s: Shape, e: Expression, t: np.ndarray, lid: int) -> np.ndarray:
    """Left-eye lid points at fractions t from the outer (0) to the inner (1) corner; lid -1 upper."""
    outer, inner = -s.eye_x - s.eye_w, -s.eye_x + s.eye_w
    height = s.eye_h * 1.1 + 0.25 * e.brow_raise if lid < 0 else s.eye_h * (0.8 - 0.35 * e.smile)
    y = -s.eye_tilt * (1 - t) + lid * height * np.sin(np.pi * t)
    return np.stack([outer + (inner - outer) * t, y], axis=1)


def _mouth(s: Shape, e: Expression) -> dict[int, tuple[float, float]]:
    """Left-half and middle mouth points: lip line bent by the smile, lower lip dropped by the opening."""
    width = s.mouth_w * (1 + 0.18 * e.smile)
    inner = 0.86 * width

    def line(x: float) -> float:
        return s.mouth_y - 0.1 * e.smile * (x / width) ** 2

    def gap(x: float) -> float:
        return e.mouth_open * math.sqrt(max(0.0, 1 - (x / inner) ** 2))

    ul, ll = s.upper_lip, s.lower_lip
    return {
        76: (-width, line(width) + 0.15 * e.mouth_open),
        77: (-0.6 * width, line(0.6 * width) - 0.75 * ul),
        78: (-0.25 * width, line(0.25 * width) - 1.05 * ul),
        79: (0.0, line(0) - 0.85 * ul),
        85: (0.0, line(0) + gap(0) + ll),
        86: (-0.27 * width, line(0.27 * width) + gap(0.27 * width) + 0.97 * ll),
        87: (-0.6 * width, line(0.6 * width) + gap(0.6 * width) + 0.75 * ll),
        88: (-inner, line(inner) + 0.15 * e.mouth_open),
        89: (-0.4 * width, line(0.4 * width) - 0.01),
        90: (0.0, line(0) - 0.005),
        94: (0.0, line(0) + gap(0)),
        95: (-0.4 * width, line(0.4 * width) + gap(0.4 * width)),
    }


def _frontal_features(s: Shape, e: Expression) -> tuple[np.ndarray, np.ndarray]:
    """Points 33..97 seen from the front, and their height above the face surface."""
    xy = np.zeros((wflw.NUM_POINTS, 2))
    lift = np.zeros(wflw.NUM_POINTS)
    xy[33] = _brow(s, e, np.array([0.0]), 0)[0]
    xy[34:38] = _brow(s, e, np.array([0.25, 0.5, 0.75, 1.0]), -1)
    xy[38:42] = _brow(s, e, np.array([1.0, 0.75, 0.5, 0.25]), 1)
    lift[33:42] = 0.03
    xy[60:65] = _eye(s, e, np.array([0.0, 0.25, 0.5, 0.75, 1.0]), -1)
    xy[65:68] = _eye(s, e, np.array([0.75, 0.5, 0.25]), 1)
    xy[96] = (-s.eye_x, -0.5 * s.eye_tilt - 0.15 * s.eye_h)
    lift[60:68], lift[96] = -0.02, 0.01
    nl, nh = s.nose_len, s.nose_height
    xy[51:55] = [(0, -0.02), (0, 0.33 * nl), (0, 0.66 * nl), (0, nl)]
    lift[51:55] = (0.08, 0.45 * nh, 0.75 * nh, nh)
    base = nl + 0.07
    xy[55:58] = [(-s.nose_w, base - 0.03), (-0.5 * s.nose_w, base + 0.01), (0, base + 0.025)]
    lift[55:58] = (0.06, 0.4 * nh, 0.5 * nh)
    for index, point in _mouth(s, e).items():
        xy[index] = point
        lift[index] = 0.06
    for index in _LEFT_FEATURES:
        xy[wflw.FLIP[index]] = (-xy[index, 0], xy[index, 1])
        lift[wflw.FLIP[index]] = lift[index]
    gaze = np.array([s.gaze[0] * 0.35 * s.eye_w, s.gaze[1] * 0.2 * s.eye_h])
    xy[96] += gaze
    xy[97] += gaze
    return xy, lift


def _on_surface(s: Shape, xy: np.ndarray, lift: float | np.ndarray = 0.0) -> np.ndarray:
    return np.column_stack([xy, _surface_z(s, xy[:, 0], xy[:, 1]) + lift])


def _landmarks_3d(s: Shape, e: Expression, yaw: float) -> np.ndarray:
    """The 98 points in 3D; the contour is the face's silhouette for this yaw."""
    xy, lift = _frontal_features(s, e)
    points = _on_surface(s, xy, lift)
    a, y = _jaw_outline(s)
    y = y + e.mouth_open * np.clip((y - 0.3) / (s.chin - 0.3), 0, 1)
    c = _depth(s, a)
    points[0:16] = _silhouette(a[:16], c[:16], y[:16], -c[:16], yaw, -1, front=True)
    points[16] = (0.0, y[16], 0.0)
    points[17:33] = _silhouette(a[:16], c[:16], y[:16], -c[:16], yaw, 1, front=True)[::-1]
    return points


@functools.lru_cache(maxsize=8)
def _unit_circle(n: int) -> tuple[np.ndarray, np.ndarray]:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return np.cos(angles), np.sin(angles)


def _ellipse_3d(centre: np.ndarray, axis_u: np.ndarray, axis_v: np.ndarray, n: int = 14) -> np.ndarray:
    cos, sin = _unit_circle(n)
    return centre + cos * axis_u + sin * axis_v


def _hair_outline(s: Shape, yaw: float) -> np.ndarray:
    """Silhouette of the skull, from its top down to the ears' level, grown by a layer of hair."""
    top = Y_TOP - 0.08
    angle = np.linspace(0, np.pi / 2, 12)
    y = np.concatenate([Y_CROWN - (Y_CROWN - top) * np.cos(angle), [0.4]])
    a = s.width * 1.04 * np.concatenate([np.sin(angle), [0.95]])
    centre_z = -s.depth * s.width
    c = s.depth * a
    right = _silhouette(a, c, y, np.full_like(y, centre_z), yaw, 1, front=False)
    left = _silhouette(a, c, y, np.full_like(y, centre_z), yaw, -1, front=False)
    outline = np.concatenate([right, left[::-1]])
    pivot = np.array([0.0, Y_CROWN, centre_z])
    return pivot + (outline - pivot) * 1.07


def _hair_front(s: Shape, landmarks: np.ndarray, yaw: float) -> np.ndarray:
    """Hair over the forehead: from a hairline well above the brows up over the top of the head."""
    hairline = min(s.hairline, landmarks[33:51, 1].min() - 0.22)
    t = np.linspace(0, np.pi, 11)
    y = hairline + 0.12 * np.cos(t) ** 2
    a = _half_width(s, y)
    c = _depth(s, a)
    line = np.stack([a * np.cos(t), y, -c + c * np.sin(t)], axis=1)
    up = np.linspace(hairline + 0.12, Y_TOP, 6)
    a_up = _half_width(s, up)
    c_up = _depth(s, a_up)
    right = _silhouette(a_up, c_up, up, -c_up, yaw, 1, front=True) * [1.05, 1, 1]
    left = _silhouette(a_up, c_up, up, -c_up, yaw, -1, front=True) * [1.05, 1, 1]
    return np.concatenate([right, left[::-1], line[::-1]])


def _outline_parts(s: Shape, landmarks: np.ndarray, yaw: float) -> dict[str, np.ndarray]:
    """Forehead, hair, ears, neck and torso outlines in 3D."""
    up = Y_TEMPLE - (Y_TEMPLE - Y_TOP) * np.sin(np.linspace(0, np.pi / 2, 9)[1:])
    a_up = _half_width(s, up)
    c_up = _depth(s, a_up)
    forehead_r = _silhouette(a_up, c_up, up, -c_up, yaw, 1, front=True)
    forehead_l = _silhouette(a_up, c_up, up, -c_up, yaw, -1, front=True)
    parts = {
        "forehead": np.concatenate([forehead_r, forehead_l[::-1]]),
        "hair_back": _hair_outline(s, yaw),
    }
    if s.hair == "long":
        parts["hair_long"] = np.array(
            [[sx * s.width * w, y, -s.depth * s.width] for sx, w, y in
             ((1, 1.1, -0.1), (1, 1.22, 1.9), (-1, 1.22, 1.9), (-1, 1.1, -0.1))]
        )  # fmt: skip
    if s.hair != "bald":
        parts["hair_front"] = _hair_front(s, landmarks, yaw)
    y_ear = 0.5 * (landmarks[96, 1] + landmarks[57, 1])
    a_ear = float(_half_width(s, np.array([y_ear]))[0])
    c_ear = s.depth * max(a_ear, 0.3)
    for name, sx in (("ear_left", -1), ("ear_right", 1)):
        centre = np.array([sx * (a_ear + 0.06), y_ear, -c_ear - 0.08])
        parts[name] = _ellipse_3d(centre, np.array([sx * 0.06, 0, -0.12]), np.array([0, 0.26, 0]))
    z = -0.6 * s.depth * s.width
    parts["neck"] = np.array([[-0.42, 0.4, z], [-0.47, 2.6, z], [0.47, 2.6, z], [0.42, 0.4, z]])
    parts["torso"] = np.array(
        [[sx * w, y, z] for sx, w, y in
         ((-1, 0.45, 1.9), (-1, 1.7, 2.2), (-1, 2.1, 3.3), (-1, 2.2, 7), (1, 2.2, 7), (1, 2.1, 3.3),
          (1, 1.7, 2.2), (1, 0.45, 1.9))]
    )  # fmt: skip
    return parts


def _feature_parts(s: Shape, landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Nose, nostrils, irises, pupils, cheeks, lid creases and eye-shadow regions in 3D."""
    nl, nw, base = s.nose_len, s.nose_w, s.nose_len + 0.07
    nose_xy = [
        (sx * w, y) for sx in (-1, 1) for w, y in ((0.07, 0.05), (0.1, 0.6 * nl), (0.9 * nw, base - 0.12))
    ]
    centres = [(sx * 0.45 * nw, base - 0.005) for sx in (-1, 1)] + [(sx * 0.55, 0.45) for sx in (-1, 1)]
    lids = np.concatenate([landmarks[60:65, :2], landmarks[68:73, :2]])
    xy = np.concatenate([nose_xy, centres, lids - [0, 0.05], lids - [0, 0.13]])
    lift = np.concatenate(
        [np.tile([0.06, 0.5 * s.nose_height, 0.14], 2), [0.35 * s.nose_height] * 2, [0.02] * 2]
    )
    points = _on_surface(s, xy, np.concatenate([lift, np.zeros(20)]))
    nose, nostrils, cheeks, creases, shadows = np.split(points, [6, 8, 10, 20])
    parts = {
        "nose": np.concatenate([nose, landmarks[51:60]]),
        "nose_side_left": nose[:3],
        "nose_side_right": nose[3:],
    }
    radius = 0.42 * s.eye_w
    for i, name in enumerate(("left", "right")):
        pupil = landmarks[96 + i]
        parts[f"nostril_{name}"] = _ellipse_3d(
            nostrils[i], np.array([0.28 * nw, 0, 0]), np.array([0, 0.025, 0]), 10
        )
        parts[f"iris_{name}"] = _ellipse_3d(pupil, np.array([radius, 0, 0]), np.array([0, radius, 0]), 16)
        parts[f"pupil_{name}"] = _ellipse_3d(
            pupil, np.array([0.4 * radius, 0, 0]), np.array([0, 0.4 * radius, 0]), 10
        )
        parts[f"cheek_{name}"] = _ellipse_3d(cheeks[i], np.array([0.17, 0, 0]), np.array([0, 0.1, 0]), 12)
        parts[f"crease_{name}"] = creases[5 * i : 5 * i + 5]
        lid = landmarks[60:65] if i == 0 else landmarks[68:73]
        parts[f"shadow_{name}"] = np.concatenate([lid, shadows[5 * i : 5 * i + 5][::-1]])
    return parts


def _rotation(pose: Pose) -> np.ndarray:
    yaw, pitch = math.radians(pose.yaw), math.radians(pose.pitch)
    ry = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]])
    return rx @ ry


@dataclass(frozen=True)
class Geometry:
    """A projected face: 98 landmarks and the render-only outlines, in one 2D frame."""

    landmarks: np.ndarray
    parts: dict[str, np.ndarray]
    scale: float = 1.0
    """Pixels per face unit."""

    def transformed(self, scale: float, offset: np.ndarray) -> Geometry:
        parts = {name: points * scale + offset for name, points in self.parts.items()}
        return Geometry(self.landmarks * scale + offset, parts, self.scale * scale)

    def fitted(self, box: np.ndarray) -> Geometry:
        """This geometry scaled and moved so that its footprint fills `box` (x0, y0, x1, y1)."""
        lo, hi = self.footprint()
        scale = float((box[2] - box[0]) / (hi - lo)[0])
        return self.transformed(scale, box[:2] - lo * scale)

    def footprint(self) -> tuple[np.ndarray, np.ndarray]:
        """Bounding box (min, max) of everything drawn in the face's patch."""
        names = ("forehead", "hair_back", "hair_long", "hair_front", "ear_left", "ear_right", "nose")
        points = np.concatenate([self.landmarks, *(self.parts[n] for n in names if n in self.parts)])
        return points.min(axis=0), points.max(axis=0)


def project_face(face: Face) -> Geometry:
    """The face's landmarks and outlines projected (orthographic, then rolled), in face units."""
    yaw = math.radians(face.pose.yaw)
    landmarks = _landmarks_3d(face.shape, face.expression, yaw)
    parts = _outline_parts(face.shape, landmarks, yaw) | _feature_parts(face.shape, landmarks)
    roll = math.radians(face.pose.roll)
    roll_matrix = np.array([[math.cos(roll), math.sin(roll)], [-math.sin(roll), math.cos(roll)]])
    arrays = [landmarks, *parts.values()]
    projected = (np.concatenate(arrays) @ _rotation(face.pose).T)[:, :2] @ roll_matrix
    flat = np.split(projected, np.cumsum([len(a) for a in arrays])[:-1])
    return Geometry(flat[0], dict(zip(parts, flat[1:], strict=True)))


# ---------------------------------------------------------------------------------------------
# Layout


def _image_size(rng: np.random.Generator, low: int, high: int) -> tuple[int, int]:
    """Long side log-uniform in [low, high], aspect 3:4..4:3."""
    long_side = math.exp(rng.uniform(math.log(low), math.log(high + 1)))
    short_side = long_side * rng.uniform(0.75, 1.0)
    long_px, short_px = (int(np.clip(v, low, high)) for v in (long_side, short_side))
    return (long_px, short_px) if rng.random() < 0.6 else (short_px, long_px)


def _overlaps(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    grow = 0.1 * (box[2:] - box[:2]).max()
    return any(
        box[0] - grow < b[2] and b[0] < box[2] + grow and box[1] - grow < b[3] and b[1] < box[3] + grow
        for b in boxes
    )


def _place(rng: np.random.Generator, sizes: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    """Non-overlapping boxes (x0, y0, x1, y1) for footprints of the given unit sizes (w, h)."""
    short = min(width, height)
    boxes: list[np.ndarray] = []
    for size in sizes:
        side = short * math.exp(rng.uniform(math.log(0.35), math.log(0.9))) / math.sqrt(len(sizes))
        side = float(np.clip(side, MIN_FACE_PX, 0.95 * short))
        box = None
        while box is None and side >= MIN_FACE_PX * 0.5:
            extent = size * side / size.max()
            for _ in range(30):
                corner = rng.uniform(0, 1, 2) * (np.array([width, height]) - extent)
                candidate = np.concatenate([corner, corner + extent])
                if not _overlaps(candidate, boxes):
                    box = candidate
                    break
            side *= 0.8
        if box is None:
            return _grid(sizes, width, height)
        boxes.append(box)
    return boxes


def _grid(sizes: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    """Fallback layout: one face per column, each scaled to fit its column."""
    cell = width / len(sizes)
    boxes = []
    for i, size in enumerate(sizes):
        extent = size * 0.9 * min(cell / size[0], height / size[1])
        corner = np.array([cell * i + (cell - extent[0]) / 2, (height - extent[1]) / 2])
        boxes.append(np.concatenate([corner, corner + extent]))
    return boxes


# ---------------------------------------------------------------------------------------------
# Drawing


@functools.lru_cache(maxsize=64)
def _spline_basis(count: int, steps: int) -> np.ndarray:
    """Matrix taking `count` points to their Catmull-Rom curve, `steps` samples per segment."""
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    weights = 0.5 * np.hstack(
        [-t + 2 * t**2 - t**3, 2 - 5 * t**2 + 3 * t**3, t + 4 * t**2 - 3 * t**3, -(t**2) + t**3]
    )
    basis = np.zeros((steps * (count - 1) + 1, count))
    for segment in range(count - 1):
        columns = np.clip(np.arange(segment - 1, segment + 3), 0, count - 1)
        for j, column in enumerate(columns):
            basis[segment * steps : (segment + 1) * steps, column] += weights[:, j]
    basis[-1, -1] = 1.0
    return basis


def _spline(points: np.ndarray, steps: int = 4) -> np.ndarray:
    """Open Catmull-Rom curve through `points` (end points repeated as their own neighbours)."""
    return _spline_basis(len(points), steps) @ points


def _loop(points: np.ndarray, first: list[int], second: list[int]) -> np.ndarray:
    """A closed outline of two splines sharing their end points (eyes, lips, brows)."""
    return np.concatenate([_spline(points[first]), _spline(points[second])[1:-1]])


def _xy(points: np.ndarray) -> list[float]:
    return points.ravel().tolist()


def _pixels(points: np.ndarray) -> np.ndarray:
    """Continuous coordinates -> Pillow drawing coordinates: the index of the pixel holding each point.

    Pillow puts pixel centres at integers and truncates each coordinate to an integer (towards zero), so
    a continuous c (integer-centre c - 0.5) is drawn at the nearest pixel centre by passing floor(c).
    """
    return np.floor(points)


def _shade(colour: tuple[int, ...], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, c * factor)) for c in colour[:3])  # type: ignore[return-value]


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain."""
    pts = sorted(map(tuple, points.tolist()))

    def half(seq: list[tuple[float, float]]) -> list[tuple[float, float]]:
        out: list[tuple[float, float]] = []
        for p in seq:
            while (
                len(out) >= 2
                and (
                    (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                    - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                )
                <= 0
            ):
                out.pop()
            out.append(p)
        return out[:-1]

    return np.array(half(pts) + half(pts[::-1]))


class _Canvas:
    """A face's patch, maybe supersampled, with a mask of the face's own pixels (the lit, blurred area)."""

    def __init__(self, image: Image.Image, box: tuple[int, int, int, int], scale: float) -> None:
        self.box = box
        self.origin = np.array(box[:2], float)
        size = (box[2] - box[0], box[3] - box[1])
        self.size = size
        self.supersample = 2 if max(size) < SUPERSAMPLE_BELOW_PX else 1
        hi = (size[0] * self.supersample, size[1] * self.supersample)
        self.image = image.crop(box).resize(hi, Image.Resampling.NEAREST)
        self.mask = Image.new("L", hi, 0)
        self.draw = ImageDraw.Draw(self.image, "RGBA")
        self.mask_draw = ImageDraw.Draw(self.mask)
        self.unit = scale * self.supersample  # hi-res pixels per face unit

    def hi(self, points: np.ndarray) -> np.ndarray:
        """Image pixels (continuous) -> Pillow drawing coordinates on the hi-res patch (see `_pixels`)."""
        return _pixels((points - self.origin) * self.supersample)

    def width(self, units: float) -> int:
        return max(1, round(units * self.unit))

    def polygon(self, points: np.ndarray, fill: tuple[int, ...], solid: bool = False) -> None:
        """Fill a polygon; `solid` ones belong to the face's own area (its mask)."""
        xy = _xy(self.hi(points))
        self.draw.polygon(xy, fill=fill)
        if solid:
            self.mask_draw.polygon(xy, fill=255)

    def erase(self, points: np.ndarray) -> None:
        """Leave this area to what the image already shows."""
        self.mask_draw.polygon(_xy(self.hi(points)), fill=0)

    def line(self, points: np.ndarray, fill: tuple[int, ...], units: float) -> None:
        self.draw.line(_xy(self.hi(points)), fill=fill, width=self.width(units), joint="curve")

    def clipped(self, clip: np.ndarray, shapes: list[tuple[np.ndarray, tuple[int, ...]]]) -> None:
        """Draw polygons only inside the polygon `clip` (iris in the eye, teeth in the mouth)."""
        hi = self.hi(clip)
        x0, y0 = np.floor(hi.min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(hi.max(axis=0)).astype(int) + 2
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1, self.image.width), min(y1, self.image.height)
        if x1 <= x0 or y1 <= y0:
            return
        region = self.image.crop((x0, y0, x1, y1))
        draw = ImageDraw.Draw(region)
        for points, fill in shapes:
            draw.polygon(_xy(self.hi(points) - [x0, y0]), fill=fill)
        mask = Image.new("L", region.size, 0)
        ImageDraw.Draw(mask).polygon(_xy(hi - [x0, y0]), fill=255)
        self.image.paste(region, (x0, y0), mask)


def _draw_eye(canvas: _Canvas, g: Geometry, look: Look, side: str, liner: bool) -> None:
    lm = g.landmarks
    first, second = ([60, 61, 62, 63, 64], [64, 65, 66, 67, 60]) if side == "left" else (
        [68, 69, 70, 71, 72], [72, 73, 74, 75, 68])  # fmt: skip
    outline = _loop(lm, first, second)
    canvas.polygon(outline, look.sclera)
    canvas.clipped(outline, [(g.parts[f"iris_{side}"], look.iris), (g.parts[f"pupil_{side}"], (12, 10, 10))])
    upper, lower = _spline(lm[first]), _spline(lm[second])
    dark = (35, 22, 18)
    canvas.line(upper, dark, 0.05 if liner else 0.022)
    canvas.line(lower, _shade(look.skin, 0.6), 0.012)
    canvas.line(_spline(g.parts[f"crease_{side}"]), (*_shade(look.skin, 0.55), 150), 0.012)


def _draw_nose(canvas: _Canvas, g: Geometry, look: Look) -> None:
    canvas.polygon(_convex_hull(g.parts["nose"]), look.skin, solid=True)
    shadow = (*_shade(look.skin, 0.5), 110)
    for side in ("left", "right"):
        canvas.line(_spline(g.parts[f"nose_side_{side}"]), shadow, 0.025)
    lm = g.landmarks
    canvas.line(_spline(lm[[55, 56, 57, 58, 59]]), (*_shade(look.skin, 0.45), 200), 0.03)
    for side in ("left", "right"):
        canvas.polygon(g.parts[f"nostril_{side}"], (*_shade(look.skin, 0.3), 230))
    canvas.line(_spline(lm[[52, 53, 54]]), (*_shade(look.skin, 1.25), 90), 0.03)


def _draw_mouth(canvas: _Canvas, g: Geometry, look: Look, opening: float) -> None:
    lm = g.landmarks
    outer = _loop(lm, [76, 77, 78, 79, 80, 81, 82], [82, 83, 84, 85, 86, 87, 76])
    upper_inner = _spline(lm[[88, 89, 90, 91, 92]])
    lower_inner = _spline(lm[[92, 93, 94, 95, 88]])
    canvas.polygon(outer, look.lips, solid=True)
    canvas.polygon(
        np.concatenate([_spline(lm[[76, 77, 78, 79, 80, 81, 82]]), upper_inner[::-1]]),
        _shade(look.lips, 0.85),
    )
    if opening > 0.02:
        inner = np.concatenate([upper_inner, lower_inner[1:-1]])
        teeth = np.concatenate([upper_inner, (upper_inner + 0.45 * (lm[94] - lm[90]))[::-1]])
        canvas.clipped(inner, [(inner, (70, 20, 25)), (teeth, (235, 230, 215))])
    canvas.line(upper_inner, (60, 25, 25), 0.018)


def _draw_face(canvas: _Canvas, face: Face, g: Geometry) -> None:
    """Hair, ears, skin, make-up, brows, eyes, nose, mouth and fringe, back to front."""
    look, lm = face.look, g.landmarks
    back_hair = look.hair if face.shape.hair != "bald" else _shade(look.skin, 0.92)
    if "hair_long" in g.parts:
        canvas.polygon(g.parts["hair_long"], look.hair, solid=True)
    canvas.polygon(g.parts["hair_back"], back_hair, solid=True)
    canvas.erase(g.parts["neck"])  # the body pass drew it, in front of long hair
    for ear in ("ear_left", "ear_right"):
        canvas.polygon(g.parts[ear], _shade(look.skin, 0.9), solid=True)
    canvas.polygon(np.concatenate([_spline(lm[0:33]), g.parts["forehead"]]), look.skin, solid=True)
    if look.blush:
        for side in ("left", "right"):
            canvas.polygon(g.parts[f"cheek_{side}"], look.blush)
    if look.eye_shadow:
        for side in ("left", "right"):
            canvas.polygon(g.parts[f"shadow_{side}"], look.eye_shadow)
    for first, second in (
        ([33, 34, 35, 36, 37], [37, 38, 39, 40, 41, 33]),
        ([42, 43, 44, 45, 46], [46, 47, 48, 49, 50, 42]),
    ):
        canvas.polygon(_loop(lm, first, second), look.brow, solid=True)
    for side in ("left", "right"):
        _draw_eye(canvas, g, look, side, liner=look.eye_shadow is not None)
    _draw_nose(canvas, g, look)
    _draw_mouth(canvas, g, look, face.expression.mouth_open)
    if "hair_front" in g.parts:
        canvas.polygon(g.parts["hair_front"], look.hair, solid=True)


def _light_map(light: Light, size: tuple[int, int], skin: np.ndarray) -> Image.Image:
    """Shading of an ellipsoid fitted to the skin's bounding box, as an RGB multiplier image."""
    grid = 24
    lo, hi = skin.min(axis=0), skin.max(axis=0)
    centre, radius = (lo + hi) / 2, np.maximum((hi - lo) / 2, 1.0)
    xs = (np.arange(grid) + 0.5) / grid * size[0]
    ys = (np.arange(grid) + 0.5) / grid * size[1]
    u = (xs[None, :] - centre[0]) / radius[0] * np.ones((grid, 1))
    v = (ys[:, None] - centre[1]) / radius[1] * np.ones((1, grid))
    normal = np.stack([u, v, np.sqrt(np.clip(1 - u**2 - v**2, 0, 1))], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    direction = np.asarray(light.direction) / np.linalg.norm(light.direction)
    shade = light.ambient + light.diffuse * np.clip(normal @ direction, 0, None)
    rgb = np.clip(shade[..., None] * np.asarray(light.colour), 0, 1)
    half = Image.fromarray((rgb * 255).astype(np.uint8)).resize(
        ((size[0] + 1) // 2, (size[1] + 1) // 2), Image.Resampling.BILINEAR
    )
    return half.resize(size, Image.Resampling.NEAREST)


def _gaussian_blur(image: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur; a large radius is applied at a reduced resolution, then scaled back."""
    factor = max(1, int(radius / 3))
    if factor == 1:
        return image.filter(ImageFilter.GaussianBlur(radius))
    small = image.reduce(factor).filter(ImageFilter.GaussianBlur(radius / factor))
    extent = (0, 0, image.width / factor, image.height / factor)
    return small.resize(image.size, Image.Resampling.BILINEAR, box=extent)


# ---------------------------------------------------------------------------------------------
# Occluders


def _occluder(rng: np.random.Generator, landmarks: np.ndarray, size: float) -> list[np.ndarray]:
    """Polygons hiding between OCCLUDED_POINTS of the landmarks: a disc, a bar from one side, a band."""
    k = int(rng.integers(OCCLUDED_POINTS[0], OCCLUDED_POINTS[1] + 1))
    kind = rng.integers(3)
    if kind == 0:
        centre = landmarks[rng.integers(len(landmarks))]
        distance = np.sort(np.linalg.norm(landmarks - centre, axis=1))
        radius = (distance[k - 1] + distance[k]) / 2
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)[:, None]
        return [centre + radius * np.hstack([np.cos(angles), np.sin(angles)])]
    angle = rng.uniform(0, 2 * np.pi) if kind == 1 else np.pi / 2 + rng.uniform(-0.35, 0.35)
    d = np.array([math.cos(angle), math.sin(angle)])
    n = np.array([-d[1], d[0]])
    proj = np.sort(landmarks @ d)
    if kind == 1:
        low, high = (proj[-k - 1] + proj[-k]) / 2, proj[-1] + size
    else:
        start = int(rng.integers(1, len(proj) - k))
        low, high = (proj[start - 1] + proj[start]) / 2, (proj[start + k - 1] + proj[start + k]) / 2
    across = landmarks @ n
    centre_n = (across.min() + across.max()) / 2
    half = size
    corners = [
        (low, centre_n - half),
        (high, centre_n - half),
        (high, centre_n + half),
        (low, centre_n + half),
    ]
    return [np.array([a * d + b * n for a, b in corners])]


def _draw_occluder(canvas: _Canvas, rng: np.random.Generator, polygons: list[np.ndarray]) -> None:
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    stripe = _shade(colour, rng.uniform(0.5, 0.8))
    for polygon in polygons:
        canvas.polygon(polygon, colour, solid=True)
        lo, hi = polygon.min(axis=0), polygon.max(axis=0)
        step = rng.uniform(0.06, 0.15) * (hi - lo).max()
        stripes = [
            np.array(
                [
                    [x, lo[1]],
                    [x + step / 2, lo[1]],
                    [x + step / 2 + (hi - lo)[1] * 0.3, hi[1]],
                    [x + (hi - lo)[1] * 0.3, hi[1]],
                ]
            )
            for x in np.arange(lo[0] - (hi - lo)[1], hi[0], step)
        ]
        canvas.clipped(polygon, [(s, stripe) for s in stripes])


# ---------------------------------------------------------------------------------------------
# Images


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field with coarse noise, and clutter (boxes, ellipses, poles, wires)."""
    coarse = (width // 8 + 2, height // 8 + 2)
    field = Image.fromarray(rng.integers(20, 236, (3, 3, 3), dtype=np.uint8)).resize(
        coarse, Image.Resampling.BICUBIC
    )
    noise = Image.fromarray(rng.integers(0, 256, (coarse[1], coarse[0], 3), dtype=np.uint8))
    texture = Image.blend(field, noise, float(rng.uniform(0.08, 0.2)))
    half = texture.resize(((width + 1) // 2, (height + 1) // 2), Image.Resampling.BILINEAR)
    image = half.resize((width, height), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    short = min(width, height)
    for _ in range(int(rng.integers(6, 20))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(0.04, 0.4, 2) * short
        kind = rng.integers(4)
        if kind == 0:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        elif kind == 1:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif kind == 2:
            end = (x + rng.uniform(-1, 1) * short, y + rng.uniform(-1, 1) * short)
            draw.line((x, y, *end), fill=colour, width=int(1 + w / 20))
        else:
            draw.polygon(_xy(np.array([x, y]) + rng.uniform(-1, 1, (5, 2)) * w), fill=colour)
    return image


def _detection_rect(
    rng: np.random.Generator, landmarks: np.ndarray, width: int, height: int
) -> tuple[int, ...]:
    """A detector-like box around the landmarks, jittered, inside the image (pixel indices 0..w-1, as
    WFLW's rectangles: `landmarks` in WFLW's convention)."""
    lo, hi = landmarks.min(axis=0), landmarks.max(axis=0)
    size = hi - lo
    jitter = rng.normal(0, 0.03, 4) * np.tile(size, 2)
    rect = np.concatenate([lo - size * [0.05, 0.1], hi + size * 0.05]) + jitter
    rect = np.clip(np.round(rect), 0, [width - 1, height - 1, width - 1, height - 1])
    return tuple(int(v) for v in rect)


def _render_face(image: Image.Image, face: Face, geometry: Geometry) -> None:
    """Draw one placed face on `image` with its light, occluder and blur."""
    lo, hi = geometry.footprint()
    box = (
        max(0, math.floor(lo[0]) - 1),
        max(0, math.floor(lo[1]) - 1),
        min(image.width, math.ceil(hi[0]) + 1),
        min(image.height, math.ceil(hi[1]) + 1),
    )
    canvas = _Canvas(image, box, geometry.scale)
    _draw_face(canvas, face, geometry)
    if face.flags[wflw.ATTRIBUTES.index("occlusion")]:
        size = float((hi - lo).max())
        _draw_occluder(canvas, face.rng_occlusion, _occluder(face.rng_occlusion, geometry.landmarks, size))
    patch = canvas.image.reduce(canvas.supersample)
    mask = canvas.mask.reduce(canvas.supersample)
    skin = np.concatenate([geometry.landmarks[0:33], geometry.parts["forehead"]]) - canvas.origin
    image.paste(ImageChops.multiply(patch, _light_map(face.light, patch.size, skin)), box[:2], mask)
    if face.blur:
        _blur_face(image, geometry, face.blur, box, mask)


def _blur_face(
    image: Image.Image, geometry: Geometry, share: float, box: tuple[int, int, int, int], mask: Image.Image
) -> None:
    """Blur the face (mask, at box) with a radius of `share` of the landmarks' size, fading out around it."""
    extent = geometry.landmarks.max(axis=0) - geometry.landmarks.min(axis=0)
    radius = share * math.sqrt(extent[0] * extent[1])
    margin = math.ceil(1.5 * radius)
    outer = (
        max(0, box[0] - margin),
        max(0, box[1] - margin),
        min(image.width, box[2] + margin),
        min(image.height, box[3] + margin),
    )
    wide_mask = Image.new("L", (outer[2] - outer[0], outer[3] - outer[1]), 0)
    wide_mask.paste(mask, (box[0] - outer[0], box[1] - outer[1]))
    soft = _gaussian_blur(wide_mask, radius).point(lambda v: min(255, 2 * v))
    image.paste(_gaussian_blur(image.crop(outer), radius), outer[:2], soft)


def _draw_body(image: Image.Image, face: Face, geometry: Geometry) -> None:
    """Torso and neck, under the face's light (on average)."""
    light = face.light
    level = np.clip((light.ambient + 0.4 * light.diffuse) * np.asarray(light.colour), 0, 1)
    draw = ImageDraw.Draw(image)
    clothes = tuple(int(c * f) for c, f in zip(face.look.clothes, level, strict=True))
    neck = tuple(int(c * f * 0.72) for c, f in zip(face.look.skin, level, strict=True))
    draw.polygon(_xy(_pixels(geometry.parts["torso"])), fill=clothes)
    draw.polygon(_xy(_pixels(geometry.parts["neck"])), fill=neck)


def render_image(job: ImageJob) -> tuple[Image.Image, list[wflw.Annotation]]:
    """Render one image of `job` and the annotations of its faces (in face order, in WFLW's convention)."""
    rng = np.random.default_rng([job.seed, job.split_index, job.image_index])
    width, height = _image_size(rng, job.min_size, job.max_size)
    faces = [sample_face(job, i) for i in range(len(job.flags))]
    shapes = [project_face(face) for face in faces]
    spans = [shape.footprint() for shape in shapes]
    boxes = _place(rng, [hi - lo for lo, hi in spans], width, height)
    placed = [shape.fitted(box) for shape, box in zip(shapes, boxes, strict=True)]
    image = _background(rng, width, height)
    for face, geometry in zip(faces, placed, strict=True):
        _draw_body(image, face, geometry)
    annotations = []
    for face, geometry in zip(faces, placed, strict=True):
        _render_face(image, face, geometry)
        landmarks = wflw.to_annotation(geometry.landmarks)  # drawn in continuous pixels, written as WFLW's
        rect = _detection_rect(face.rng_rect, landmarks, width, height)
        annotations.append(wflw.Annotation(landmarks, rect, face.flags, job.relpath))  # type: ignore[arg-type]
    return image, annotations


def render_job(job: ImageJob) -> tuple[bytes, list[str]]:
    """Render one image: its JPEG bytes and its faces' annotation lines."""
    image, annotations = render_image(job)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), [wflw.format_line(a) for a in annotations]


# ---------------------------------------------------------------------------------------------
# Planning and archives


def _faces_per_image(rng: np.random.Generator, total: int) -> list[int]:
    draws = rng.choice(len(FACES_PER_IMAGE_P), size=total, p=FACES_PER_IMAGE_P) + 1
    cumulative = np.cumsum(draws)
    last = int(np.searchsorted(cumulative, total))
    counts = draws[: last + 1].tolist()
    counts[-1] -= int(cumulative[last]) - total
    return counts


def _image_relpath(event: str, number: int) -> str:
    """`0--Parade/0_Parade_synthetic_17.jpg`, as WIDER names its files."""
    event_id, name = event.split("--", 1)
    return f"{event}/{event_id}_{name.replace('--', '')}_synthetic_{number}.jpg"


def plan_jobs(params: SyntheticParams) -> list[ImageJob]:
    """Every image of both splits in archive order (train, then test), with its faces' flags."""
    rates = np.array([FLAG_RATES[name] for name in wflw.ATTRIBUTES])
    jobs: list[ImageJob] = []
    for split_index, (split, total) in enumerate(
        (("train", params.train_faces), ("test", params.test_faces))
    ):
        rng = np.random.default_rng([params.seed, split_index])
        counts = _faces_per_image(rng, total)
        flags = (rng.random((total, len(rates))) < rates).tolist()
        events = rng.integers(len(EVENTS), size=len(counts))
        start = 0
        for image_index, (count, event) in enumerate(zip(counts, events, strict=True)):
            jobs.append(
                ImageJob(
                    seed=params.seed,
                    split=split,
                    split_index=split_index,
                    image_index=image_index,
                    relpath=_image_relpath(EVENTS[event], len(jobs)),
                    flags=tuple(tuple(f) for f in flags[start : start + count]),
                    min_size=params.min_image_size,
                    max_size=params.max_image_size,
                )
            )
            start += count
    return jobs


@contextlib.contextmanager
def _atomic_tar(path: Path, compresslevel: int) -> Iterator[tarfile.TarFile]:
    """A reproducible .tar.gz (gzip mtime 0) written to a temp file, renamed onto `path` on success."""
    with (
        atomic_path(path) as temp,
        open(temp, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=compresslevel) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        yield tar


def _tar_info(name: str, size: int = 0, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = 0o755 if directory else 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if directory:
        info.type = tarfile.DIRTYPE
    return info


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    tar.addfile(_tar_info(name, directory=True))


def write_images_archive(path: Path, images: Iterable[tuple[str, bytes]]) -> None:
    """Write `WFLW_images.tar.gz`: each (relpath, bytes) as member `WFLW_images/<relpath>`."""
    with _atomic_tar(path, IMAGES_COMPRESSLEVEL) as tar:
        _add_dir(tar, wflw.IMAGES_ROOT)
        folders: set[str] = set()
        for relpath, data in images:
            folder = relpath.rpartition("/")[0]
            if folder and folder not in folders:
                folders.add(folder)
                _add_dir(tar, f"{wflw.IMAGES_ROOT}/{folder}")
            _add_file(tar, f"{wflw.IMAGES_ROOT}/{relpath}", data)


RECT_ATTR_README = """\
Synthetic WFLW (generated by wflw_pipeline.synthetic), in the format of WFLW's annotations.

list_98pt_rect_attr_train.txt, list_98pt_rect_attr_test.txt: one face per line,
207 values separated by spaces:
  x0 y0 ... x97 y97                   98 landmarks in image pixels (196 values)
  x_min y_min x_max y_max             the face detection rectangle (4 values)
  pose expression illumination make-up occlusion blur    attributes (6 values)
  image_name                          relative to WFLW_images

Attributes: pose: normal 0, large 1; expression: normal 0, exaggerated 1;
illumination: normal 0, extreme 1; make-up: no 0, yes 1; occlusion: no 0, yes 1;
blur: clear 0, blurred 1.
"""

TEST_LIST_README = """\
Synthetic WFLW (generated by wflw_pipeline.synthetic), in the format of WFLW's annotations.

list_98pt_test.txt: every test face; list_98pt_test_<subset>.txt: the test faces of one
subset (largepose, expression, illumination, makeup, occlusion, blur), i.e. those whose
attribute is 1 in list_98pt_rect_attr_test.txt. One face per line: x0 y0 ... x97 y97 image_name.
"""


def _text(lines: Iterable[str]) -> bytes:
    return "".join(f"{line}\n" for line in lines).encode()


def _test_lists(test_lines: Iterable[str]) -> dict[str, list[str]]:
    """The list_98pt_test* members from the test split's lines; lines that do not parse are left out."""
    annotations = []
    for number, line in enumerate(test_lines, 1):
        try:
            annotations.append(wflw.parse_line(line))
        except wflw.AnnotationError as err:
            logger.debug("test line %d left out of the subset lists: %s", number, err)
    lists = {wflw.test_list_member(): [wflw.format_test_list_line(a) for a in annotations]}
    for attribute in wflw.ATTRIBUTES:
        lists[wflw.test_list_member(attribute)] = [
            wflw.format_test_list_line(a) for a in annotations if a.flag(attribute)
        ]
    return lists


def write_annotations_archive(path: Path, lines: dict[str, list[str]]) -> None:
    """Write `WFLW_annotations.tar.gz` from raw lines per split; the test lists are derived from 'test'."""
    with _atomic_tar(path, ANNOTATIONS_COMPRESSLEVEL) as tar:
        _add_dir(tar, wflw.ANNOTATIONS_ROOT)
        _add_dir(tar, wflw.RECT_ATTR_DIR)
        _add_file(tar, f"{wflw.RECT_ATTR_DIR}/README", RECT_ATTR_README.encode())
        for split, split_lines in lines.items():
            _add_file(tar, wflw.annotation_member(split), _text(split_lines))
        _add_dir(tar, wflw.TEST_LIST_DIR)
        _add_file(tar, f"{wflw.TEST_LIST_DIR}/README", TEST_LIST_README.encode())
        for member, member_lines in _test_lists(lines.get("test", [])).items():
            _add_file(tar, member, _text(member_lines))


def _render_all(jobs: list[ImageJob], workers: int) -> Iterator[tuple[bytes, list[str]]]:
    """render_job over `jobs`, in order, on `workers` processes (1: in this process)."""
    if workers == 1:
        yield from map(render_job, jobs)
        return
    # fork where there is one: spawn would re-import an unguarded __main__ script in each worker
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        yield from pool.imap(render_job, jobs, chunksize=8)


def generate_archives(out_dir: Path, params: SyntheticParams) -> tuple[Path, Path]:
    """Generate the synthetic WFLW into out_dir; returns (images archive, annotations archive)."""
    params.validate("data.synthetic")
    out_dir = Path(out_dir)
    images_path = out_dir / wflw.IMAGES_ARCHIVE
    annotations_path = out_dir / wflw.ANNOTATIONS_ARCHIVE
    jobs = plan_jobs(params)
    workers = params.workers or os.cpu_count() or 1
    logger.info(
        "rendering %d synthetic images (%d train + %d test faces) on %d processes",
        len(jobs), params.train_faces, params.test_faces, workers,
    )  # fmt: skip
    lines: dict[str, list[str]] = {split: [] for split in wflw.SPLITS}

    def images() -> Iterator[tuple[str, bytes]]:
        results = _render_all(jobs, workers)
        for job, (data, job_lines) in progress_bar(
            zip(jobs, results, strict=True), total=len(jobs), desc="synthetic WFLW", unit="img"
        ):
            lines[job.split].extend(job_lines)
            yield job.relpath, data

    write_images_archive(images_path, images())
    write_annotations_archive(annotations_path, lines)
    logger.info("wrote %s and %s", images_path, annotations_path)
    return images_path, annotations_path
