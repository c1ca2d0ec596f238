"""Region annotations as QuPath GeoJSON: the one reader and writer of annotation files.

What QuPath writes with *File -> Export objects as GeoJSON* (and reads with *File -> Import objects*):
a ``FeatureCollection`` (or, with "export as FeatureCollection" unticked, a bare JSON list of
``Feature`` objects) whose features carry

* ``geometry``: ``Polygon`` or ``MultiPolygon`` in level-0 pixel coordinates (x to the right, y down),
  each polygon a list of rings, the first the outer boundary and the others holes;
* ``properties.objectType``: ``"annotation"`` for the regions a pathologist draws (``"detection"`` and
  ``"tile"`` are cells and tiles, not regions; they are left out unless asked for);
* ``properties.classification``: ``{"name": ..., "color": [r, g, b]}`` (optional), ``properties.name``
  (optional), ``properties.measurements`` (an object in QuPath >= 0.4).

Older exports have no ``objectType`` but ``"isLocked"`` etc.; a feature without ``objectType`` is taken
as an annotation. ``GeometryCollection`` members that are polygons are kept; points and lines have no
area and are skipped (with a count in the log).

Geometry uses shapely (pinned in requirements.txt): it makes invalid rings valid (self-touching
rings QuPath can export) and unions overlapping annotations, so areas are exact.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry import Polygon, shape

from scripts.utils.errors import BundleError
from scripts.utils.io_utils import atomic_path

logger = logging.getLogger(__name__)

AREA_TYPES = ("Polygon", "MultiPolygon")
_UUID_NAMESPACE = uuid.UUID("0b5c2f57-9a7e-4a55-bb0e-3d6f3a2c9e41")


class AnnotationError(BundleError, ValueError):
    """An annotation file that cannot be used; the message names the file and the fix."""


@dataclass
class Annotation:
    """One annotated region: a shapely (Multi)Polygon in level-0 pixels, its class and name."""

    geometry: object  # shapely Polygon / MultiPolygon
    classification: str = ""
    color: tuple[int, int, int] | None = None
    name: str = ""
    properties: dict = field(default_factory=dict)

    @property
    def area(self) -> float:
        return float(self.geometry.area)


def _shape(geometry: dict, where: str):
    """A valid shapely (Multi)Polygon from a GeoJSON geometry, or None for geometries without area."""
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind == "GeometryCollection":
        parts = [_shape(g, where) for g in geometry.get("geometries", [])]
        parts = [p for p in parts if p is not None]
        return shapely.union_all(parts) if parts else None
    if kind not in AREA_TYPES:
        return None
    try:
        geom = shape(geometry)
    except Exception as error:  # noqa: BLE001 - shapely raises several types for malformed coordinates
        raise AnnotationError(f"{where}: malformed {kind} coordinates ({error}); re-export the annotations from QuPath") from error
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
        polys = [g for g in getattr(geom, "geoms", [geom]) if g.geom_type in AREA_TYPES]
        geom = shapely.union_all(polys) if polys else None
    if geom is None or geom.is_empty or geom.area <= 0:
        return None
    return geom


def read_annotations(
    path: str | Path,
    object_types: Sequence[str] = ("annotation",),
    classes: Sequence[str] | None = None,
) -> list[Annotation]:
    """Read the area annotations of a QuPath GeoJSON export.

    Args:
        path: ``.geojson`` / ``.json`` file (FeatureCollection, one Feature, or a list of Features).
        object_types: which ``properties.objectType`` values to keep (a feature without one counts as
            ``"annotation"``).
        classes: keep only these classification names (None = all, unclassified included).

    Raises:
        AnnotationError: the file is missing, not JSON, or not GeoJSON features.
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file {path} does not exist; fix the datalist's 'annotations' column or export "
                              "the slide's annotations from QuPath (File > Export objects as GeoJSON)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AnnotationError(f"annotation file {path} is not JSON ({error}); export it from QuPath as GeoJSON") from error
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise AnnotationError(f"annotation file {path} is not GeoJSON features (expected a FeatureCollection, a Feature "
                              "or a list of Features); export it from QuPath with File > Export objects as GeoJSON")
    if not isinstance(features, list):
        raise AnnotationError(f"annotation file {path}: 'features' must be a list")
    wanted_types = set(object_types)
    wanted_classes = None if classes is None else set(classes)
    out: list[Annotation] = []
    skipped_shapes = 0
    for i, feature in enumerate(features):
        where = f"annotation file {path}, feature {i}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise AnnotationError(f"{where} is not a GeoJSON Feature")
        props = feature.get("properties") or {}
        if props.get("objectType", "annotation") not in wanted_types:
            continue
        cls = props.get("classification") or {}
        cls_name = str(cls.get("name", "")) if isinstance(cls, dict) else str(cls)
        if wanted_classes is not None and cls_name not in wanted_classes:
            continue
        geom = _shape(feature.get("geometry") or {}, where)
        if geom is None:
            skipped_shapes += 1
            continue
        color = cls.get("color") if isinstance(cls, dict) else None
        out.append(Annotation(geom, cls_name, tuple(int(c) for c in color[:3]) if color else None,
                              str(props.get("name", "")), dict(props)))
    if skipped_shapes:
        logger.info("%s: %d feature(s) without area (points, lines, empty polygons) skipped", path, skipped_shapes)
    return out


def annotation_union(annotations: Iterable[Annotation]):
    """The union of the annotations' geometries (a shapely geometry; empty when there are none)."""
    geoms = [a.geometry for a in annotations]
    return shapely.union_all(geoms) if geoms else Polygon()


def _rings(geom) -> list[list[list[list[float]]]]:
    """GeoJSON polygon coordinate lists (outer ring first, then holes) of a (Multi)Polygon."""
    polygons = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
    return [[[list(map(float, xy)) for xy in ring.coords] for ring in (p.exterior, *p.interiors)] for p in polygons]


def annotation_feature(annotation: Annotation, feature_id: str | None = None) -> dict:
    """One QuPath annotation Feature (objectType "annotation", classification, measurements object)."""
    rings = _rings(annotation.geometry)
    geometry = ({"type": "Polygon", "coordinates": rings[0]} if len(rings) == 1
                else {"type": "MultiPolygon", "coordinates": rings})
    properties = {k: v for k, v in annotation.properties.items()
                  if k not in ("objectType", "classification", "name")}
    properties["objectType"] = "annotation"
    if annotation.name:
        properties["name"] = annotation.name
    if annotation.classification:
        properties["classification"] = {"name": annotation.classification,
                                        "color": list(annotation.color or (200, 0, 0))}
    properties.setdefault("isLocked", False)
    feature = {"type": "Feature", "geometry": geometry, "properties": properties}
    if feature_id:
        feature["id"] = feature_id
    return feature


def write_annotations(path: str | Path, annotations: Sequence[Annotation], slide_id: str = "") -> Path:
    """Write annotations as a QuPath-importable GeoJSON FeatureCollection (level-0 pixels), atomically."""
    features = [annotation_feature(a, str(uuid.uuid5(_UUID_NAMESPACE, f"{slide_id}/{i}"))) for i, a in enumerate(annotations)]
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":")) + "\n")
    return path


def polygon_annotation(rings: Sequence[Sequence[Sequence[float]]] | Sequence[Sequence[Sequence[Sequence[float]]]],
                       classification: str = "", color: tuple[int, int, int] | None = None, name: str = "") -> Annotation:
    """An :class:`Annotation` from GeoJSON-style coordinates: one polygon (list of rings: outer, holes)
    or several polygons (list of such lists)."""
    depth = np.asarray(rings[0][0]).ndim  # polygon: rings[0][0] is a point (1-d); multipolygon: a ring (2-d)
    geometry = {"type": "Polygon" if depth == 1 else "MultiPolygon", "coordinates": rings}
    geom = _shape(geometry, "polygon_annotation")
    if geom is None:
        raise ValueError("the polygon has no area")
    return Annotation(geom, classification, color, name)


__all__ = ["Annotation", "AnnotationError", "read_annotations", "write_annotations", "annotation_union",
           "annotation_feature", "polygon_annotation"]
