"""The tiny-sd concept world: a seeded procedural renderer of 64x64 images with three attributes.

Every image shows one ``object`` in one ``color`` rendered in one ``style`` (a texture named after a
painter it recalls). These names are the project's public vocabulary: prompts use them verbatim.
"""
import re

import numpy as np

OBJECTS = ("circle", "square", "triangle", "star", "heart", "cross", "hexagon", "moon")
COLORS = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (240, 215, 30), "green": (40, 160, 60),
    "cyan": (30, 200, 215), "blue": (35, 65, 215), "purple": (135, 50, 185), "pink": (245, 125, 195),
}
STYLES = ("none", "Van Gogh", "Seurat", "Mondrian", "Pollock", "Rothko", "Hokusai")
ATTRIBUTES = {"object": OBJECTS, "color": tuple(COLORS), "style": STYLES}
SIZE = 64
RADIUS = (17.0, 21.0)  # object radius in pixels (object coordinates span about [-1, 1])
JITTER = 0.25  # the centre moves within this fraction of the free space around the image centre


def _polygon_mask(x, y, sides, apothem):
    """Regular convex polygon: inside every edge's half-plane."""
    angles = np.arange(sides) * 2 * np.pi / sides + np.pi / 2 + np.pi / sides
    return np.all([x * np.cos(a) + y * np.sin(a) <= apothem for a in angles], axis=0)


def _star_mask(x, y, inner=0.42):
    r, phi = np.hypot(x, y), np.arctan2(x, y)  # angle from the top point
    a = np.abs((phi + np.pi / 5) % (2 * np.pi / 5) - np.pi / 5)  # fold into one point's half-sector
    p1, p2 = np.array([1.0, 0.0]), inner * np.array([np.cos(np.pi / 5), np.sin(np.pi / 5)])
    edge = p2 - p1
    r_edge = (p1[0] * edge[1] - p1[1] * edge[0]) / (np.cos(a) * edge[1] - np.sin(a) * edge[0])
    return r <= r_edge


def object_mask(name, x, y):
    """Boolean mask of object ``name`` in object coordinates (about [-1, 1], y up)."""
    if name == "circle":  # smaller than the hexagon's corners, so the pair stays apart through the autoencoder
        return x**2 + y**2 <= 0.8**2
    if name == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.75
    if name == "triangle":
        return _polygon_mask(x, y + 0.15, 3, 0.5)
    if name == "star":
        return _star_mask(x, y)
    if name == "heart":
        xs, ys = x * 1.15, y * 1.15 + 0.15
        return (xs**2 + ys**2 - 1) ** 3 - xs**2 * ys**3 <= 0
    if name == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95))
    if name == "hexagon":  # pointy top, corners at 1.04: they and the vertical sides stand 0.1-0.24 outside the circle
        return _polygon_mask(x, y, 6, 0.9)
    if name == "moon":
        return (x**2 + y**2 <= 0.95) & ((x - 0.5) ** 2 + (y - 0.2) ** 2 > 0.6)
    raise ValueError(f"object '{name}' unknown; choose from {', '.join(OBJECTS)}")


def _smooth_noise(rng, cells, size=SIZE):
    """Value noise: a random grid of ``cells`` x ``cells`` bilinearly upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i, f = t.astype(int), t - t.astype(int)
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def _texture(style, rng, X, Y, mask):
    """Return (background RGB float image, per-pixel brightness for the object, overlay RGBA or None)."""
    h = w = SIZE
    ones = np.ones((h, w))
    if style == "none":
        bg = np.ones((h, w, 3)) * (np.array([236, 234, 228]) + rng.integers(-8, 8, 3))
        return bg, ones, None
    if style == "Van Gogh":  # swirling strokes: a flow field of curved bands
        cx, cy, k = rng.uniform(10, 54), rng.uniform(10, 54), rng.uniform(0.35, 0.5)
        r, th = np.hypot(X - cx, Y - cy), np.arctan2(Y - cy, X - cx)
        swirl = np.sin(k * r + 2.5 * np.sin(2 * th + r / 9) + rng.uniform(0, 6.28))
        bg = np.stack([30 + 40 * (swirl > 0.3), 50 + 60 * (swirl > 0.3), 120 + 90 * (swirl > 0.3)], -1) * 1.0
        bg[swirl > 0.85] = (235, 205, 70)
        return bg, 0.86 + 0.14 * (swirl > -0.2), None
    if style == "Seurat":  # pointillism: everything made of dots on a pale ground
        bg = np.ones((h, w, 3)) * np.array([245, 240, 225])
        overlay = np.zeros((h, w, 4))
        step = 4
        jitter = rng.uniform(-0.8, 0.8, (2, h // step + 1, w // step + 1))
        gx = (X / step).round().astype(int).clip(0, w // step)
        gy = (Y / step).round().astype(int).clip(0, h // step)
        dx = X - (gx * step + jitter[0, gy, gx])
        dy = Y - (gy * step + jitter[1, gy, gx])
        dots = dx**2 + dy**2 <= 2.6
        palette = np.array([[195, 220, 195], [200, 210, 235], [230, 225, 195]])  # pale, so the object stands out
        bg_dot = palette[rng.integers(0, 3, (h // step + 1, w // step + 1))][gy, gx]
        bg[dots & ~mask] = bg_dot[dots & ~mask]
        overlay[~dots & mask] = (245, 240, 225, 1)  # gaps between the object's dots show the ground
        return bg, ones, overlay
    if style == "Mondrian":  # black grid with blocks
        xs = np.sort(rng.choice(np.arange(8, 56), 3, replace=False))
        ys = np.sort(rng.choice(np.arange(8, 56), 3, replace=False))
        lines = np.isin(X.astype(int), np.concatenate([xs, xs + 1])) | np.isin(Y.astype(int), np.concatenate([ys, ys + 1]))
        block = np.searchsorted(xs, X) * 4 + np.searchsorted(ys, Y)
        shades = np.array([[250, 250, 248], [225, 225, 222], [240, 240, 236], [205, 205, 200]])
        bg = shades[(block * 7 + rng.integers(0, 4)) % 4] * 1.0
        overlay = np.zeros((h, w, 4))
        overlay[lines] = (15, 15, 15, 1)
        return bg, ones, overlay
    if style == "Pollock":  # splatter: drips and dots over everything
        bg = np.ones((h, w, 3)) * np.array([228, 214, 188])
        overlay = np.zeros((h, w, 4))
        for _ in range(rng.integers(6, 10)):
            x0, y0, x1, y1 = rng.uniform(0, 64, 4)
            t = np.clip(((X - x0) * (x1 - x0) + (Y - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2 + 1e-6), 0, 1)
            near = np.hypot(X - x0 - t * (x1 - x0), Y - y0 - t * (y1 - y0)) <= rng.uniform(0.5, 1.0)
            overlay[near] = (*rng.choice([(20, 20, 20), (90, 60, 40), (245, 245, 240)]), 1)
        for _ in range(rng.integers(25, 40)):
            x0, y0 = rng.uniform(0, 64, 2)
            overlay[np.hypot(X - x0, Y - y0) <= rng.uniform(0.8, 2.0)] = (20, 20, 20, 1)
        return bg, ones, overlay
    if style == "Rothko":  # soft horizontal bands
        split = rng.uniform(26, 38)
        band = 1 / (1 + np.exp(-(Y - split) / 2.5))
        top, bottom = np.array([110, 35, 40]), np.array([45, 30, 60])
        bg = top * (1 - band[..., None]) + bottom * band[..., None]
        bg = bg * (0.9 + 0.2 * _smooth_noise(rng, 4)[..., None])
        bands = 0.88 + 0.12 * (0.5 + 0.5 * np.cos(Y / 64 * 2 * np.pi * 1.5 + rng.uniform(0, 6.28)))
        return bg, bands, None
    if style == "Hokusai":  # waves: scalloped crests in rows
        phase = rng.uniform(0, 6.28)
        wave = np.sin(X / 3.2 + phase + 1.8 * np.sin(Y / 5.0)) + np.sin(Y / 2.2)
        bg = np.ones((h, w, 3)) * np.array([232, 226, 205])
        bg[wave > 0.6] = (30, 70, 140)
        bg[(wave > 0.6) & (wave < 0.9)] = (245, 245, 240)
        overlay = np.zeros((h, w, 4))
        overlay[mask & (wave > 1.2) & (wave < 1.55)] = (250, 250, 250, 1)  # foam lines across the object
        return bg, ones, overlay
    raise ValueError(f"style '{style}' unknown; choose from {', '.join(STYLES)}")


OUTLINED = ("Van Gogh", "Mondrian", "Pollock", "Hokusai")  # a painted contour keeps the object readable


def _outline(mask):
    """Pixels of ``mask`` that touch the outside (a 1-pixel contour)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def render(object_name, color, style, seed):
    """Render one 64x64 RGB image (uint8, H x W x 3); the same arguments give the same pixels."""
    return render_with_mask(object_name, color, style, seed)[0]


def render_with_mask(object_name, color, style, seed):
    """``render``'s image and the boolean mask of the object's pixels."""
    if color not in COLORS:
        raise ValueError(f"color '{color}' unknown; choose from {', '.join(COLORS)}")
    rng = np.random.default_rng(seed)
    Y, X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    # Upright, as icons are drawn, with bounded size and a centre jittered within a quarter of the free space:
    # a rotated or freely placed shape averages to a blob, which is what an undertrained UNet then draws.
    radius = rng.uniform(*RADIUS)
    free = SIZE / 2 - radius - 2
    cx, cy = SIZE / 2 + rng.uniform(-free, free, 2) * JITTER
    x, y = (X - cx) / radius, (cy - Y) / radius
    mask = object_mask(object_name, x, y)
    background, brightness, overlay = _texture(style, rng, X, Y, mask)
    fill = np.array(COLORS[color], dtype=np.float64) * brightness[..., None]
    image = np.where(mask[..., None], fill, background)
    if overlay is not None:
        alpha = overlay[..., 3:]
        image = image * (1 - alpha) + overlay[..., :3] * alpha
    if style in OUTLINED:
        image[_outline(mask)] = (25, 25, 30)
    return np.clip(image, 0, 255).round().astype(np.uint8), mask


def sample_attributes(rng):
    """A uniformly random (object, color, style) triple."""
    return (OBJECTS[rng.integers(len(OBJECTS))], tuple(COLORS)[rng.integers(len(COLORS))],
            STYLES[rng.integers(len(STYLES))])


# Caption templates. {in_style}/{by_style} become "in the style of Seurat"/"by Seurat", or "in flat
# colors" for style none; {style} alone is the painter's name ("flat colors" for none).
TEMPLATES = (
    "a {color} {object}",
    "a {object}",
    "an image of a {color} {object}",
    "a {color} {object} {in_style}",
    "a {object} {in_style}",
    "a painting {by_style}",
    "{style}",
    "a {color} {object}, painted {by_style}",
    "a {color} shape {in_style}",
    "a {object} {by_style}",
    "something {color}",
    "a {color} {object} painting {by_style}",
    # the same words at other positions, so that a concept is learned as a word, not as a position
    "{object}",
    "{color}",
    "{style}, a {color} {object}",
    "{in_style}: a {object}",
    "a {object} in {color}",
    "{color} {object}",
    "{object}, {color}, {style}",
    "{style} painted a {object} in {color}",
)
EMPTY_CAPTION_RATE = 0.1


def style_phrases(style):
    """The words a caption uses for ``style``: (name, "in ..." clause, "by ..." clause)."""
    if style == "none":
        return "flat colors", "in flat colors", "in flat colors"
    return style, f"in the style of {style}", f"by {style}"


def fill_template(template, object_name, color, style):
    """A template with the attributes filled in; returns (caption, {attribute: value} it mentions)."""
    name, in_style, by_style = style_phrases(style)
    caption = template.format(object=object_name, color=color, style=name, in_style=in_style, by_style=by_style)
    caption = re.sub(r"\ba (?=[aeiouAEIOU])", "an ", caption)
    mentioned = {"object": object_name, "color": color, "style": style}
    keys = {"object": "{object}", "color": "{color}", "style": "style}"}
    return caption, {k: v for k, v in mentioned.items() if keys[k] in template}


def random_caption(object_name, color, style, rng, empty_rate=EMPTY_CAPTION_RATE):
    """A caption of a random template (or, at ``empty_rate``, the empty caption for guidance)."""
    return random_caption_named(object_name, color, style, rng, empty_rate)[0]


def random_caption_named(object_name, color, style, rng, empty_rate=EMPTY_CAPTION_RATE):
    """``random_caption`` and the {attribute: value} it names."""
    if rng.random() < empty_rate:
        return "", {}
    return fill_template(TEMPLATES[rng.integers(len(TEMPLATES))], object_name, color, style)
