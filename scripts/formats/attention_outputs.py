"""What a pathologist opens after inference: attention files, heat maps, top-k patches and QuPath GeoJSON.

Every writer takes the same description of a slide's patches:

* ``coords`` (N, 2) integer level-0 top-left corners (x, y) of the patches (the order of the patch and
  feature files);
* ``patch_size_level0``: the side of one patch in level-0 pixels (e.g. 512 for a 256-px patch at
  0.5 um/px on a 0.25 um/px scan);
* ``scores`` (N,) attention of each patch (SMILE's softmax attention, summing to 1 over the slide).

Raw softmax attention depends on the number of patches (it averages 1/N), so the pictures show the
within-slide percentile rank of each patch (0 = least, 100 = most attended); the raw value and the
percentile are both stored in the attention HDF5 file and as QuPath measurements.

Memory stays O(N) with small constants: the heat map is painted on a canvas of thumbnail size, the
GeoJSON is streamed feature by feature, and nothing builds an N x N array.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import shapely
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from shapely.geometry import LineString, Polygon
from shapely.ops import split, unary_union

from scripts.formats.layout import OutputLayout
from scripts.utils.io_utils import atomic_path

# QuPath classes of the exported tiles: the top 10% most attended, the next 40%, the rest.
ATTENTION_TIERS = (
    (90.0, "Attention high", (220, 30, 30)),
    (50.0, "Attention medium", (250, 160, 30)),
    (-1.0, "Attention low", (60, 110, 220)),
)
_UUID_NAMESPACE = uuid.UUID("6f1c1f9e-0c57-4c1e-9a53-7b1f6f0d5a11")


# ----------------------------------------------------------------------------------------------- checks
def check_patch_inputs(coords, scores, patch_size_level0) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate and normalise (coords (N,2) int64, scores (N,) float64, patch side > 0)."""
    coords = np.asarray(coords)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2) level-0 (x, y) corners; got shape {coords.shape}")
    if coords.shape[0] != scores.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates but {scores.shape[0]} scores: they must match one to one")
    if not np.all(np.isfinite(scores)):
        raise ValueError("attention scores contain NaN or infinity")
    patch_size_level0 = float(patch_size_level0)
    if not patch_size_level0 > 0:
        raise ValueError(f"patch_size_level0 must be positive; got {patch_size_level0}")
    return coords.astype(np.int64, copy=False), scores, patch_size_level0


def percentile_rank(scores) -> np.ndarray:
    """Within-slide percentile rank in [0, 100] (ties share their mean rank); one patch -> 100."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = scores.shape[0]
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.full(1, 100.0)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.arange(n, dtype=np.float64)
    # ties: give every member of a group of equal scores the mean of its ranks
    sorted_scores = scores[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], n]
    if len(starts) != n:
        mean_rank = (starts + ends - 1) / 2.0
        ranks[order] = np.repeat(mean_rank, ends - starts)
    return 100.0 * ranks / (n - 1)


# ------------------------------------------------------------------------------------------ attention h5
def write_attention_h5(
    path: str | Path,
    coords,
    scores,
    patch_size_level0: float,
    attrs: dict | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``coords`` (N,2), ``attention`` (N,) and ``attention_percentile`` (N,) (+ ``extra`` arrays)."""
    coords, scores, patch_size_level0 = check_patch_inputs(coords, scores, patch_size_level0)
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle.create_dataset("coords", data=coords.astype(np.int64))
            handle.create_dataset("attention", data=scores.astype(np.float32))
            handle.create_dataset("attention_percentile", data=percentile_rank(scores).astype(np.float32))
            for name, values in (extra or {}).items():
                values = np.asarray(values)
                if values.shape[0] != coords.shape[0]:
                    raise ValueError(f"extra dataset {name!r} has {values.shape[0]} rows, expected {coords.shape[0]}")
                handle.create_dataset(name, data=values)
            handle.attrs["patch_size_level0"] = patch_size_level0
            handle.attrs["n_patches"] = int(coords.shape[0])
            for key, value in (attrs or {}).items():
                handle.attrs[key] = "" if value is None else value
    return path


def read_attention_h5(path: str | Path) -> dict:
    """Read an attention file back: dict with the datasets and an ``attrs`` dict."""
    with h5py.File(path, "r") as handle:
        out = {name: handle[name][()] for name in handle.keys()}
        out["attrs"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in handle.attrs.items()}
    return out


# --------------------------------------------------------------------------------------------- heat map
def score_canvas(
    canvas_shape: tuple[int, int],
    downsample: tuple[float, float] | float,
    coords,
    patch_size_level0: float,
    values,
) -> np.ndarray:
    """Paint each patch's value onto a (H, W) float canvas (NaN where no patch); overlaps are averaged.

    ``downsample`` is level-0 pixels per canvas pixel, (dx, dy) or one number.
    """
    coords, values, patch_size_level0 = check_patch_inputs(coords, values, patch_size_level0)
    h, w = int(canvas_shape[0]), int(canvas_shape[1])
    dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float32)
    x0 = np.floor(coords[:, 0] / dx).astype(np.int64)
    y0 = np.floor(coords[:, 1] / dy).astype(np.int64)
    x1 = np.maximum(np.ceil((coords[:, 0] + patch_size_level0) / dx).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.ceil((coords[:, 1] + patch_size_level0) / dy).astype(np.int64), y0 + 1)
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    for i in range(coords.shape[0]):  # each patch covers a few canvas pixels; N slice writes are cheap
        if x1[i] > x0[i] and y1[i] > y0[i]:
            total[y0[i]:y1[i], x0[i]:x1[i]] += values[i]
            count[y0[i]:y1[i], x0[i]:x1[i]] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def write_heatmap_png(
    path: str | Path,
    thumbnail: np.ndarray,
    downsample: tuple[float, float] | float,
    coords,
    patch_size_level0: float,
    scores,
    title: str = "",
    cmap: str = "jet",
    alpha: float = 0.45,
    outlines: list[np.ndarray] | None = None,
) -> Path:
    """Heat map of attention percentile over the slide thumbnail, with a colour bar, as a PNG.

    Args:
        thumbnail: (H, W, 3) uint8 RGB thumbnail of the whole slide.
        downsample: level-0 pixels per thumbnail pixel, (dx, dy) or one number.
        outlines: annotation rings, each (K, 2) level-0 (x, y) (:func:`annotation_outlines`), drawn as
            black-and-white lines over the attention (visible on any colour of the map).
    """
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] < 3:
        raise ValueError(f"thumbnail must be (H, W, 3) RGB; got shape {thumbnail.shape}")
    thumbnail = thumbnail[..., :3]
    coords, scores, patch_size_level0 = check_patch_inputs(coords, scores, patch_size_level0)
    canvas = score_canvas(thumbnail.shape[:2], downsample, coords, patch_size_level0, percentile_rank(scores))

    h, w = thumbnail.shape[:2]
    dpi = 100
    fig_w = max(w / dpi, 3.0) + 1.4  # room for the colour bar
    fig_h = max(h / dpi, 3.0) + 0.6
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.subplots()
    ax.imshow(thumbnail, interpolation="nearest")
    norm = mcolors.Normalize(vmin=0.0, vmax=100.0)
    overlay = ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, norm=norm, alpha=alpha, interpolation="nearest")
    dx, dy = (downsample, downsample) if np.isscalar(downsample) else downsample
    for ring in outlines or []:
        ring = np.asarray(ring, dtype=np.float64)
        # pixel centres: level-0 coordinate x lies at thumbnail position x / dx - 0.5
        xs, ys = ring[:, 0] / dx - 0.5, ring[:, 1] / dy - 0.5
        ax.plot(xs, ys, color="white", linewidth=2.6, solid_joinstyle="round")
        ax.plot(xs, ys, color="black", linewidth=1.1, solid_joinstyle="round")
    if outlines:
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)
    bar = fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.02)
    bar.solids.set_alpha(1.0)
    bar.set_label("attention percentile within slide (100 = most attended)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)


def annotation_outlines(annotations) -> list[np.ndarray]:
    """Every ring (outer boundaries and holes) of annotations (:mod:`scripts.formats.annotations`) as
    (K, 2) level-0 (x, y) arrays, for :func:`write_heatmap_png`."""
    rings = []
    for annotation in annotations or []:
        geom = getattr(annotation, "geometry", annotation)
        for polygon in getattr(geom, "geoms", [geom]):
            if polygon.geom_type != "Polygon":
                continue
            rings.append(np.asarray(polygon.exterior.coords))
            rings.extend(np.asarray(r.coords) for r in polygon.interiors)
    return rings


# ---------------------------------------------------------------------------------------------- top-k
def top_k_indices(scores, k: int) -> np.ndarray:
    """Indices of the k highest scores, highest first (O(N) selection, not a full sort)."""
    scores = np.asarray(scores).reshape(-1)
    k = int(min(max(k, 0), scores.shape[0]))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def write_topk_png(
    path: str | Path,
    read_patch: Callable[[int, int], np.ndarray],
    coords,
    scores,
    k: int = 8,
    tile_px: int = 192,
    columns: int = 4,
    title: str = "",
) -> Path:
    """A grid of the k most attended patches, each captioned with rank, attention and level-0 (x, y).

    ``read_patch(x, y)`` returns the RGB patch whose level-0 top-left corner is (x, y) (any size; it is
    resized to ``tile_px``).
    """
    coords = np.asarray(coords)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    idx = top_k_indices(scores, k)
    if len(idx) == 0:
        raise ValueError("no patches to show: the slide has no tissue patches")
    percentiles = percentile_rank(scores)
    columns = max(1, min(columns, len(idx)))
    rows = math.ceil(len(idx) / columns)
    caption_h, header_h, pad = 30, (24 if title else 0), 6
    width = columns * (tile_px + pad) + pad
    height = header_h + rows * (tile_px + caption_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if title:
        draw.text((pad, 5), title, fill=(0, 0, 0), font=font)
    for rank, i in enumerate(idx):
        x, y = int(coords[i, 0]), int(coords[i, 1])
        patch = np.asarray(read_patch(x, y))
        if patch.ndim == 2:
            patch = np.stack([patch] * 3, axis=-1)
        tile = Image.fromarray(np.ascontiguousarray(patch[..., :3]).astype(np.uint8)).resize((tile_px, tile_px), Image.BILINEAR)
        col, row = rank % columns, rank // columns
        left = pad + col * (tile_px + pad)
        top = header_h + pad + row * (tile_px + caption_h + pad)
        sheet.paste(tile, (left, top))
        draw.text((left, top + tile_px + 2), f"#{rank + 1}  attn {scores[i]:.2e}  p{percentiles[i]:.0f}",
                  fill=(0, 0, 0), font=font)
        draw.text((left, top + tile_px + 15), f"x={x} y={y}", fill=(80, 80, 80), font=font)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)


# --------------------------------------------------------------------------------------------- GeoJSON
def tile_polygon(x: float, y: float, size: float, width: float | None, height: float | None) -> list[list[float]]:
    """Closed square ring (level-0 px), clipped to [0, width] x [0, height] when those are given."""
    x0, y0, x1, y1 = float(x), float(y), float(x + size), float(y + size)
    if width is not None:
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    if height is not None:
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def attention_tier(percentile: float) -> tuple[str, tuple[int, int, int]]:
    for lower, name, colour in ATTENTION_TIERS:
        if percentile > lower or lower < 0:
            return name, colour
    raise AssertionError("unreachable")


def write_geojson(
    path: str | Path,
    coords,
    scores,
    patch_size_level0: float,
    slide_size: tuple[int, int] | None = None,
    slide_id: str = "",
    object_type: str = "tile",
) -> Path:
    """QuPath-importable GeoJSON: a FeatureCollection with one square tile per patch, in level-0 pixels.

    Each feature has ``properties``: ``objectType`` ("tile" or "detection"), ``name`` ("patch <i>"), a
    ``classification`` (attention tier: high = top 10%, medium = next 40%, low) and ``measurements``
    as a JSON object {"attention": raw softmax attention, "attention_percentile": 0-100}. QuPath >= 0.4
    writes and reads measurements as an object (qupath/qupath pull request #1099, which kept reading
    the older list-of-{name, value} form too). Features are streamed to disk one at a time.

    Args:
        slide_size: level-0 (width, height); polygons are clipped to it when given.
    """
    if object_type not in ("tile", "detection", "annotation"):
        raise ValueError(f"object_type must be 'tile', 'detection' or 'annotation'; got {object_type!r}")
    coords, scores, patch_size_level0 = check_patch_inputs(coords, scores, patch_size_level0)
    width, height = (None, None) if slide_size is None else (float(slide_size[0]), float(slide_size[1]))
    percentiles = percentile_rank(scores)
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write('{"type": "FeatureCollection", "features": [\n')
            for i in range(coords.shape[0]):
                tier, colour = attention_tier(percentiles[i])
                feature = {
                    "type": "Feature",
                    "id": str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}/{i}")),
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [tile_polygon(coords[i, 0], coords[i, 1], patch_size_level0, width, height)],
                    },
                    "properties": {
                        "objectType": object_type,
                        "name": f"patch {i}",
                        "classification": {"name": tier, "color": list(colour)},
                        "isLocked": True,
                        "measurements": {
                            "attention": float(scores[i]),
                            "attention_percentile": round(float(percentiles[i]), 3),
                        },
                    },
                }
                if i:
                    handle.write(",\n")
                handle.write(json.dumps(feature, separators=(",", ":")))
            handle.write("\n]}\n")
    return path


# ------------------------------------------------------------------------------------ tier outlines
def tier_outlines(
    coords,
    scores,
    patch_size_level0: float,
    region: tuple[float, float, float, float] | None = None,
    slide_size: tuple[int, int] | None = None,
) -> list[tuple[str, tuple[int, int, int], list[list[list[float]]]]]:
    """The patches of ``region`` merged per attention tier into a few hole-free outlines (for viewers).

    A viewer such as QuPath draws one object per polygon it receives; one square per patch is thousands of
    objects on a real slide. Here the patches of each :data:`ATTENTION_TIERS` tier (the within-slide
    percentile over *all* patches, as in the GeoJSON) are unioned with shapely, and each union is cut into
    pieces without holes (ASAP XML and DSA polylines carry one ring per polygon, so a hole would be drawn
    filled): a polygon with a hole is split by a vertical line through a point inside the hole, until none
    is left; collinear and sub-pixel vertices are then dropped (``simplify(0.5)``).

    Args:
        region: level-0 ``(x, y, width, height)``; a patch belongs to it when its top-left corner lies in
            ``[x, x + width) x [y, y + height)``, so each patch falls in exactly one tile of a tiling.
            None: every patch.
        slide_size: level-0 (width, height); outlines are clipped to it when given.

    Returns:
        ``[(tier name, RGB colour, [closed ring, ...]), ...]`` for the tiers that have patches in the
        region, highest tier first; a ring is a list of ``[x, y]`` level-0 pixels, first point repeated last.
    """
    coords, scores, patch_size_level0 = check_patch_inputs(coords, scores, patch_size_level0)
    if coords.shape[0] == 0:
        return []
    percentiles = percentile_rank(scores)
    inside = np.ones(coords.shape[0], dtype=bool)
    if region is not None:
        x, y, width, height = (float(v) for v in region)
        inside = (coords[:, 0] >= x) & (coords[:, 0] < x + width) & (coords[:, 1] >= y) & (coords[:, 1] < y + height)
    # only the region's patches are drawn (a viewer asks tile by tile); their tiers use the whole slide's ranks
    corners = coords[inside]
    boxes = shapely.box(corners[:, 0], corners[:, 1], corners[:, 0] + patch_size_level0, corners[:, 1] + patch_size_level0)
    if slide_size is not None:
        boxes = shapely.intersection(boxes, shapely.box(0, 0, float(slide_size[0]), float(slide_size[1])))
    tiers = np.array([attention_tier(p)[0] for p in percentiles[inside]])
    outlines = []
    for _, name, colour in ATTENTION_TIERS:
        chosen = tiers == name
        if not chosen.any():
            continue
        merged = unary_union(boxes[chosen])
        pieces = [g.simplify(0.5) for part in getattr(merged, "geoms", [merged]) for g in _hole_free(part) if g.area > 0]
        rings = [[[round(float(px), 2), round(float(py), 2)] for px, py in piece.exterior.coords] for piece in pieces]
        outlines.append((name, colour, rings))
    return outlines


def _hole_free(polygon, depth: int = 0) -> list:
    """``polygon`` cut into pieces without interior rings (see :func:`tier_outlines`)."""
    if polygon.geom_type != "Polygon":
        return [g for part in getattr(polygon, "geoms", []) for g in _hole_free(part, depth)]
    if not polygon.interiors:
        return [polygon]
    if depth > 256:  # cannot happen on a patch grid (each cut opens a hole); keep the outline, lose the hole
        return [Polygon(polygon.exterior)]
    x = Polygon(polygon.interiors[0]).representative_point().x  # strictly inside the hole
    _, miny, _, maxy = polygon.bounds
    pieces = split(polygon, LineString([(x, miny - 1.0), (x, maxy + 1.0)])).geoms
    return [g for piece in pieces for g in _hole_free(piece, depth + 1)]


# ---------------------------------------------------------------------------------------- all at once
def write_slide_outputs(
    output_dir: str | Path,
    slide_id: str,
    coords,
    scores,
    patch_size_level0: float,
    thumbnail: np.ndarray,
    downsample: tuple[float, float] | float,
    slide_size: tuple[int, int] | None,
    read_patch: Callable[[int, int], np.ndarray] | None = None,
    probability: float | None = None,
    top_k: int = 8,
    attrs: dict | None = None,
    extra: dict[str, np.ndarray] | None = None,
    annotations=None,
) -> dict[str, Path]:
    """Write attention/<id>.h5, heatmaps/<id>.png, heatmaps/<id>_topk.png (if read_patch), geojson/<id>.geojson.

    ``annotations`` (a list of :class:`scripts.formats.annotations.Annotation`) are outlined on the heat map.
    """
    layout = OutputLayout(output_dir)
    title = slide_id if probability is None else f"{slide_id}   P(STAS) = {probability:.3f}"
    written = {
        "attention": write_attention_h5(layout.attention_file(slide_id), coords, scores, patch_size_level0,
                                        attrs=dict(attrs or {}, slide_id=slide_id), extra=extra),
        "heatmap": write_heatmap_png(layout.heatmap(slide_id), thumbnail, downsample, coords,
                                     patch_size_level0, scores, title=title,
                                     outlines=annotation_outlines(annotations) if annotations else None),
        "geojson": write_geojson(layout.geojson(slide_id), coords, scores, patch_size_level0,
                                 slide_size=slide_size, slide_id=slide_id),
    }
    if read_patch is not None and top_k > 0:
        written["topk"] = write_topk_png(layout.topk(slide_id), read_patch, coords, scores,
                                         k=top_k, title=f"{title}   top {min(top_k, len(scores))} attended patches")
    return written

