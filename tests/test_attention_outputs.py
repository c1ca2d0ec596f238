"""Attention writers on a real H&E slide (Aperio CMU-1 region) with synthetic attention scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from scripts.formats.attention_outputs import (
    percentile_rank,
    read_attention_h5,
    score_canvas,
    top_k_indices,
    write_geojson,
    write_slide_outputs,
)

PATCH_L0 = 512  # a 256-px patch at 0.5 um/px on a ~0.25 um/px scan; on CMU (0.499 um/px) 256 would do


@pytest.fixture(scope="module")
def cmu(shared_slides):
    openslide = pytest.importorskip("openslide")
    slide = openslide.OpenSlide(str(shared_slides / "cmu-1-small-region.svs"))
    width, height = slide.dimensions
    thumb = np.asarray(slide.get_thumbnail((512, 512)).convert("RGB"))
    patch = 256
    xs, ys = np.meshgrid(np.arange(0, width - patch + 1, patch), np.arange(0, height - patch + 1, patch))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)
    # one edge patch that sticks out of the slide: the GeoJSON must clip it
    coords = np.vstack([coords, [[width - 100, height - 100]]])
    rng = np.random.default_rng(0)
    scores = rng.gamma(1.0, size=len(coords))
    scores /= scores.sum()

    def read_patch(x, y):
        return np.asarray(slide.read_region((int(x), int(y)), 0, (patch, patch)).convert("RGB"))

    yield dict(slide=slide, size=(width, height), thumb=thumb, coords=coords, scores=scores, patch=patch,
               read_patch=read_patch)
    slide.close()


def test_all_outputs_on_real_slide(cmu, tmp_path):
    width, height = cmu["size"]
    thumb = cmu["thumb"]
    downsample = (width / thumb.shape[1], height / thumb.shape[0])
    written = write_slide_outputs(tmp_path, "cmu", cmu["coords"], cmu["scores"], cmu["patch"], thumb, downsample,
                                  cmu["size"], read_patch=cmu["read_patch"], probability=0.73, top_k=6,
                                  attrs={"model": "synthetic"})
    assert set(written) == {"attention", "heatmap", "geojson", "topk"}
    assert written["heatmap"] == tmp_path / "heatmaps" / "cmu.png"
    assert written["topk"] == tmp_path / "heatmaps" / "cmu_topk.png"

    # attention file round trip
    att = read_attention_h5(tmp_path / "attention" / "cmu.h5")
    np.testing.assert_array_equal(att["coords"], cmu["coords"])
    np.testing.assert_allclose(att["attention"], cmu["scores"], rtol=1e-6)
    assert att["attrs"]["slide_id"] == "cmu" and att["attrs"]["patch_size_level0"] == cmu["patch"]
    assert att["attention_percentile"].max() == pytest.approx(100) and att["attention_percentile"].min() == 0

    # heat map: a real picture larger than the thumbnail (colour bar beside it), not blank
    heat = np.asarray(Image.open(written["heatmap"]).convert("RGB"))
    assert heat.shape[0] >= thumb.shape[0] and heat.shape[1] > thumb.shape[1]
    assert heat.std() > 10
    # the hottest colours of the jet map (saturated red) appear where the most attended patches are
    assert ((heat[..., 0] > 200) & (heat[..., 1] < 80) & (heat[..., 2] < 80)).sum() > 0

    topk = Image.open(written["topk"])
    assert topk.size[0] > 4 * 150 and topk.size[1] > 2 * 150

    # GeoJSON parses back: one tile per patch, all inside the slide, scores as QuPath measurements
    data = json.loads((tmp_path / "geojson" / "cmu.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    assert len(features) == len(cmu["coords"])
    ids = set()
    for i, feature in enumerate(features):
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        assert feature["geometry"]["type"] == "Polygon" and ring.shape == (5, 2)
        assert (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= width
        assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= height
        assert ring[:, 0].min() == cmu["coords"][i, 0] and ring[:, 1].min() == cmu["coords"][i, 1]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"].startswith("Attention")
        assert props["measurements"]["attention"] == pytest.approx(cmu["scores"][i])
        ids.add(feature["id"])
    assert len(ids) == len(features)
    # the clipped edge patch
    last = np.asarray(features[-1]["geometry"]["coordinates"][0])
    assert last[:, 0].max() == width and last[:, 1].max() == height
    # top 10% are "high"
    n_high = sum(f["properties"]["classification"]["name"] == "Attention high" for f in features)
    assert abs(n_high - 0.1 * len(features)) <= 2


def test_heatmap_marks_the_attended_region(tmp_path):
    """A block of high attention in the top-left quarter shows as hot pixels there and nowhere else."""
    from scripts.formats.attention_outputs import write_heatmap_png

    thumb = np.full((200, 200, 3), 230, np.uint8)
    xs, ys = np.meshgrid(np.arange(0, 2000, 100), np.arange(0, 2000, 100))
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    scores = np.where((coords[:, 0] < 1000) & (coords[:, 1] < 1000), 1.0, 0.01) + np.arange(len(coords)) * 1e-6
    canvas = score_canvas((200, 200), 10.0, coords, 100, percentile_rank(scores))
    assert np.isfinite(canvas).all()
    assert canvas[:100, :100].min() > canvas[100:, 100:].max()
    out = write_heatmap_png(tmp_path / "h.png", thumb, 10.0, coords, 100, scores)
    assert out.is_file()


def test_percentile_and_topk_edge_cases():
    np.testing.assert_allclose(percentile_rank([3.0, 1.0, 2.0]), [100, 0, 50])
    np.testing.assert_allclose(percentile_rank([1.0, 1.0]), [50, 50])
    np.testing.assert_allclose(percentile_rank([5.0]), [100])
    assert list(top_k_indices([0.1, 0.5, 0.3, 0.9], 2)) == [3, 1]
    assert len(top_k_indices([0.1], 5)) == 1


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="2 coordinates but 3 scores"):
        write_geojson(tmp_path / "x.geojson", np.zeros((2, 2)), np.ones(3), 256)
    with pytest.raises(ValueError, match="NaN"):
        write_geojson(tmp_path / "x.geojson", np.zeros((1, 2)), [np.nan], 256)
    assert not (tmp_path / "x.geojson").exists()


def test_heatmap_draws_annotation_outlines_where_they_are(tmp_path):
    """An annotation square drawn over a uniform heat map: its black outline lands at the square's place."""
    from scripts.formats.annotations import polygon_annotation
    from scripts.formats.attention_outputs import annotation_outlines, write_heatmap_png

    thumb = np.full((200, 200, 3), 255, np.uint8)
    coords = np.array([[x, y] for y in range(0, 2000, 500) for x in range(0, 2000, 500)])
    scores = np.ones(len(coords))
    lesion = polygon_annotation([[[500, 500], [1500, 500], [1500, 1000], [500, 1000], [500, 500]],
                                 [[800, 600], [1000, 600], [1000, 800], [800, 800], [800, 600]]])
    rings = annotation_outlines([lesion])
    assert len(rings) == 2 and rings[0].shape[1] == 2  # outer ring and the hole
    plain = np.asarray(Image.open(write_heatmap_png(tmp_path / "a.png", thumb, 10.0, coords, 512, scores)).convert("L"))
    outlined = np.asarray(Image.open(write_heatmap_png(tmp_path / "b.png", thumb, 10.0, coords, 512, scores,
                                                       outlines=rings)).convert("L"))
    assert plain.shape == outlined.shape
    changed = np.argwhere(np.abs(outlined.astype(int) - plain.astype(int)) > 60)
    assert len(changed) > 100
    # the changed pixels span a box with the annotation's 2:1 aspect (1000 x 500 level-0 px)
    (y0, x0), (y1, x1) = changed.min(0), changed.max(0)
    assert 1.6 < (x1 - x0) / (y1 - y0) < 2.4


def test_tier_outlines_merge_each_tier_without_holes():
    """A ring of highly attended patches around a low one, on a 6 x 6 grid: every tier's union is drawn exactly
    (no patch lost, none added), no polygon has a hole (ASAP/DSA cannot carry one), and far fewer polygons
    than patches come back; a region keeps only the patches whose corner lies in it, ranked over the slide."""
    import shapely

    from scripts.formats.attention_outputs import attention_tier, percentile_rank, tier_outlines

    side = 256
    xs, ys = np.meshgrid(np.arange(6) * side, np.arange(6) * side)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    gx, gy = coords[:, 0] // side, coords[:, 1] // side
    scores = np.where((np.maximum(abs(gx - 2), abs(gy - 2)) == 1), 50.0, 1.0)  # ring around cell (2, 2)
    scores[(gx == 5) & (gy == 5)] = 100.0  # the single most attended patch
    scores = scores + np.arange(len(scores)) * 1e-3  # no ties
    outlines = tier_outlines(coords, scores, side)
    tiers = [attention_tier(p)[0] for p in percentile_rank(scores)]
    assert [name for name, _, _ in outlines] == ["Attention high", "Attention medium", "Attention low"]
    total = 0
    for name, colour, rings in outlines:
        polygons = [shapely.Polygon(r) for r in rings]
        assert all(p.is_valid and not p.interiors for p in polygons)
        assert all(r[0] == r[-1] for r in rings)
        mine = np.array([t == name for t in tiers])
        expected = shapely.union_all(shapely.box(coords[mine, 0], coords[mine, 1], coords[mine, 0] + side,
                                                 coords[mine, 1] + side))
        assert shapely.symmetric_difference(expected, shapely.union_all(polygons)).area == pytest.approx(0, abs=1e-6)
        assert sum(p.area for p in polygons) == pytest.approx(expected.area)  # pieces do not overlap
        total += len(rings)
    assert total <= 8 < len(coords)

    region = (256, 256, 512, 512)  # cells (1..2, 1..2)
    inside = (gx >= 1) & (gx <= 2) & (gy >= 1) & (gy <= 2)
    clipped = tier_outlines(coords, scores, side, region=region, slide_size=(1400, 1400))
    area = sum(shapely.Polygon(r).area for _, _, rings in clipped for r in rings)
    assert area == pytest.approx(inside.sum() * side * side)
    # tiers ranked over the whole slide: the region's ring patches stay "medium", its centre "low" (ranked
    # inside the region alone, the ring would be its top patches)
    assert [name for name, _, _ in clipped] == ["Attention medium", "Attention low"]
    assert {tiers[i] for i in np.flatnonzero(inside)} == {"Attention medium", "Attention low"}
    assert tier_outlines(coords[:0], scores[:0], side) == []
    edge = tier_outlines(coords, scores, side, slide_size=(1400, 1400))  # the last column is cut at x = 1400
    assert max(max(x for x, _ in r) for _, _, rings in edge for r in rings) == pytest.approx(1400)
