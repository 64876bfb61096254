"""Scene layout and drawing for the synthetic "shapes" corpus (question text lives in `shapes.py`).

A scene is 2-4 solid shapes on a plain dark background, at most one per image quadrant, each
kept a margin away from the quadrant borders, so that "top left" etc. is never ambiguous and
objects never overlap. Shapes are drawn without anti-aliasing: every object pixel has exactly
the object's RGB colour, which lets tests (and saliency checks) find objects by colour.

Boxes are `[x0, y0, x1, y1]` in pixels with x1/y1 exclusive: the object covers columns
`x0 <= x < x1` and rows `y0 <= y < y1`, and touches all four box edges.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from alignti.errors import AlignTIError

SHAPES = ("circle", "square", "triangle")
# Size words of description answers: a side in the lower half of the side range is "small".
SIZES = ("small", "large")
# Saturated, well-separated colours: a tiny vision tower must tell them apart at 64 px.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
BACKGROUND = (24, 24, 24)
# Quadrant index q = column + 2 * row.
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object; `box` is [x0, y0, x1, y1] (exclusive end), `quadrant` indexes POSITIONS."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    quadrant: int

    @property
    def position(self) -> str:
        return POSITIONS[self.quadrant]

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "box": list(self.box)}


def geometry(image_size: int) -> tuple[int, int, int]:
    """(min side, max side, margin) in pixels: 14-22 px sides and a 3 px margin at 64 px, scaled."""
    if image_size < MIN_IMAGE_SIZE:
        raise AlignTIError(f"image size must be at least {MIN_IMAGE_SIZE} px, got {image_size}")
    scale = image_size / 64
    lo, hi = round(14 * scale), round(22 * scale)
    margin = max(2, round(3 * scale))
    return lo, hi, margin


def size_word(box: tuple[int, int, int, int] | list[int], image_size: int) -> str:
    """"small" for a side at most the middle of the side range (14-18 px at 64 px), else "large"."""
    lo, hi, _ = geometry(image_size)
    return SIZES[0] if 2 * (box[2] - box[0]) <= lo + hi else SIZES[1]


def position_of_box(box: tuple[int, int, int, int] | list[int], image_size: int) -> str:
    """Quadrant name of a box that lies entirely inside one quadrant; ValueError otherwise."""
    x0, y0, x1, y1 = box
    half = image_size // 2
    col = 0 if x1 <= half else 1 if x0 >= half else None
    row = 0 if y1 <= half else 1 if y0 >= half else None
    if col is None or row is None:
        raise ValueError(f"box {list(box)} straddles a quadrant border")
    return POSITIONS[col + 2 * row]


def place_objects(rng: random.Random, specs: list[tuple[str, str]], image_size: int) -> list[ShapeObject]:
    """Lay out (color, shape) specs in distinct random quadrants; returned in quadrant order.

    Each object gets a random square side in [lo, hi] and a random offset that keeps it at least
    `margin` px inside its quadrant, so boxes never overlap and never touch the centre lines.
    """
    if not 1 <= len(specs) <= 4 or len(set(specs)) != len(specs):
        raise ValueError(f"need 1-4 distinct (color, shape) specs, got {specs}")
    lo, hi, margin = geometry(image_size)
    half = image_size // 2
    quadrants = rng.sample(range(4), len(specs))
    objects = []
    for (color, shape), q in zip(specs, quadrants):
        side = rng.randint(lo, hi)
        qx, qy = (q % 2) * half, (q // 2) * half
        x0 = qx + rng.randint(margin, half - margin - side)
        y0 = qy + rng.randint(margin, half - margin - side)
        objects.append(ShapeObject(shape, color, (x0, y0, x0 + side, y0 + side), q))
    return sorted(objects, key=lambda o: o.quadrant)


def render(objects: list[ShapeObject], image_size: int) -> Image.Image:
    """RGB image [image_size, image_size] with every object drawn in its flat colour."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        fill = COLORS[obj.color]
        # PIL's rectangle/ellipse/polygon coordinates are inclusive, our boxes exclusive.
        if obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "triangle":
            # Apex up; the apex is one pixel (odd side) or two (even side) on the top row.
            apex_l, apex_r = x0 + (x1 - 1 - x0) // 2, x0 + (x1 - x0) // 2
            draw.polygon([(apex_l, y0), (apex_r, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return img


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding with fixed settings and no metadata chunks (no time stamp): same image, same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
