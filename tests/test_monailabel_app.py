"""The MONAI Label app (apps/monailabel) through a real ``monailabel start_server`` process.

The server runs on a free port of 127.0.0.1 over a studies folder holding the real CMU H&E region, a
synthetic demo slide, the TCGA slide without µm/px and a corrupt file; the models are two small fold
checkpoints and the encoder has random weights (the probability means nothing, but it must be the same
number as :func:`scripts.workflows.predict.predict_slide` gives for the same slide). Requests are the stock
``POST /infer/wsi_v2/<model>`` that QuPath's and DSA's MONAI Label extensions send (a multipart form with a
``wsi`` JSON field), and answers are read the way those extensions read them: ASAP XML ``Annotation``
elements (class = ``Name``, polygon = its ``Coordinate`` X/Y) and DSA JSON ``elements`` (``points``).
Skipped when MONAI Label is not installed (``make serve-install``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import xml.etree.ElementTree as ET

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="MONAI Label is not installed: `make serve-install` adds it to .venv")
shapely = pytest.importorskip("shapely")

from test_inference import _fold_checkpoints  # noqa: E402 (small training-style fold checkpoints)

pytestmark = pytest.mark.slow
OPTIONS = {"allow_random_weights": True, "mask_backend": "scipy", "num_workers": 1}
TIERS = ("Attention high", "Attention medium", "Attention low")
RESULT = re.compile(r"^SMILE: (STAS predicted|no STAS), P\(STAS\)=([0-9.]+), threshold ([0-9.]+)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log_path) -> None:
        self.url, self.process, self.log_path = url, process, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def wsi(self, model: str, image: str, output: str, location=(0, 0), size=(2048, 2048), tile_size=(1024, 1024),
            params: dict | None = None, endpoint: str = "wsi_v2") -> tuple[int, bytes]:
        """The extensions' request. ``wsi_v2``: POST /infer/wsi_v2/<model>?image=..&output=.. with a multipart
        ``wsi`` field (DSA; QuPath when it uploads a region). ``wsi``: the same region as a JSON body to
        /infer/wsi/<model>, which is what the QuPath extension in MONAI Label's repository sends for an image the server has."""
        wsi = {"level": 0, "location": list(location), "size": list(size), "tile_size": list(tile_size),
               "min_poly_area": 30, "params": params or {"foreground": [], "background": [], "max_workers": 1}}
        query = urllib.parse.urlencode({"image": image, "output": output})
        if endpoint == "wsi":
            body, content_type = json.dumps(wsi).encode(), "application/json"
        else:
            boundary = uuid.uuid4().hex
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"wsi\"\r\n\r\n{json.dumps(wsi)}\r\n"
                    f"--{boundary}--\r\n").encode()
            content_type = f"multipart/form-data; boundary={boundary}"
        request = urllib.request.Request(f"{self.url}/infer/{endpoint}/{model}?{query}", data=body, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_slides):
    from scripts.demo.cohort import make_demo_cohort

    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "broken.svs"):
        (studies / name).symlink_to(shared_slides / name)
    datalist = make_demo_cohort(root / "demo", n_slides=1, n_patients=1, size_um=512, seed=3, show_progress=False)
    row = next(csv.DictReader(open(datalist)))
    demo = studies / f"demo_{row['slide_id']}.tiff"
    demo.symlink_to(datalist.parent / row["path"])
    _fold_checkpoints(root / "cv", n=2, thresholds=(0.4, 0.6))
    return {"root": root, "studies": studies, "cv": root / "cv", "demo": demo}


@pytest.fixture(scope="module")
def server(cohort, bundle_root):
    port = _free_port()
    log_path = cohort["root"] / "server.log"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(bundle_root / "apps" / "monailabel"),
           "--studies", str(cohort["studies"]), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "models", "smile", "--conf", "checkpoints", str(cohort["cv"]),
           "--conf", "output_dir", str(cohort["root"] / "server_out"), "--conf", "allow_random_weights", "true",
           "--conf", "override.mask_backend", "scipy", "--conf", "override.num_workers", "1"]
    env = dict(os.environ, MONAI_LABEL_SESSION_PATH=str(cohort["root"] / "sessions"))
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd=bundle_root, env=env, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.time() + 180
    while True:
        if process.poll() is not None:
            pytest.fail(f"the MONAI Label server exited with {process.returncode}:\n{srv.log()}")
        try:
            if srv.get("/info/")[0] == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            process.kill()
            pytest.fail(f"the MONAI Label server did not answer /info/ within 180 s:\n{srv.log()}")
        time.sleep(1)
    yield srv
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def _asap(body: bytes) -> list[tuple[str, np.ndarray]]:
    """(class name, N x 2 polygon) per ASAP ``Annotation``, as the QuPath extension builds its objects."""
    root = ET.fromstring(body)
    out = []
    for annotation in root.iter("Annotation"):
        points = sorted(annotation.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        out.append((annotation.get("Name"), np.array([[float(c.get("X")), float(c.get("Y"))] for c in points])))
    return out


def _dsa(body: bytes) -> list[tuple[str, np.ndarray]]:
    """(label, N x 2 polygon) per DSA element (``points`` are x, y, z)."""
    document = json.loads(body)
    return [(e["label"]["value"], np.asarray(e["points"], dtype=float)[:, :2]) for e in document["elements"]]


def _check_against_prediction(polygons, prediction, region=None, merged=True):
    """Tier polygons cover exactly the region's patches (those whose corner lies in it); one result element
    whose P(STAS) and threshold are the prediction's."""
    results = [(name, ring) for name, ring in polygons if RESULT.match(name)]
    assert len(results) == 1, [name for name, _ in polygons]
    decision, probability, threshold = RESULT.match(results[0][0]).groups()
    assert float(probability) == pytest.approx(prediction.probability, abs=6e-4)
    assert float(threshold) == pytest.approx(prediction.threshold, abs=6e-4)
    assert (decision == "STAS predicted") == bool(prediction.decision)
    tiers = [(name, ring) for name, ring in polygons if not RESULT.match(name)]
    assert {name for name, _ in tiers} <= set(TIERS)
    coords, side = prediction.coords, prediction.patch_size_level0
    inside = np.ones(len(coords), bool)
    if region is not None:
        x, y, w, h = region
        inside = (coords[:, 0] >= x) & (coords[:, 0] < x + w) & (coords[:, 1] >= y) & (coords[:, 1] < y + h)
    assert inside.sum() > 0
    patches = shapely.union_all(shapely.box(coords[inside, 0], coords[inside, 1], coords[inside, 0] + side,
                                            coords[inside, 1] + side))
    drawn = shapely.union_all([shapely.Polygon(ring) for _, ring in tiers])
    assert shapely.symmetric_difference(patches, drawn).area < 0.01 * patches.area  # on the tissue patches
    if merged:  # one tile per 1024 px: neighbouring patches of a tier come back as one polygon
        assert len(tiers) < inside.sum()
    # each tier's polygons hold that tier's patches (a patch centre inside a polygon of its own tier)
    from scripts.formats.attention_outputs import attention_tier, percentile_rank

    percentiles = percentile_rank(prediction.attention)
    by_tier = {name: shapely.union_all([shapely.Polygon(r) for n, r in tiers if n == name]) for name in TIERS}
    for i in np.flatnonzero(inside):
        centre = shapely.Point(coords[i, 0] + side / 2, coords[i, 1] + side / 2)
        assert by_tier[attention_tier(percentiles[i])[0]].contains(centre)
    return results[0][1]


def test_info_lists_the_model_with_its_labels(server):
    status, body = server.get("/info/")
    assert status == 200
    info = json.loads(body)
    model = info["models"]["smile"]
    assert set(TIERS) <= set(model["labels"]) and model["config"]["multi_gpu"] is False
    status, body = server.get("/datastore/?output=all")
    assert status == 200 and {"cmu-1-small-region", "broken"} <= set(json.loads(body)["objects"])


def test_asap_on_the_cmu_region_equals_predict_slide(server, cohort, shared_slides, tmp_path):
    status, body = server.wsi("smile", "cmu-1-small-region", "asap", size=(2220, 2967), endpoint="wsi")  # QuPath's call
    assert status == 200, body[:500]
    polygons = _asap(body)
    status, body_v2 = server.wsi("smile", "cmu-1-small-region", "asap", size=(2220, 2967))
    assert status == 200  # the form-encoded endpoint gives the same answer (served from the per-slide cache)
    again = _asap(body_v2)
    assert [n for n, _ in again] == [n for n, _ in polygons]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(again, polygons))
    from scripts.workflows.predict import predict_slide

    prediction = predict_slide(shared_slides / "cmu-1-small-region.svs", cohort["cv"], tmp_path / "api",
                               slide_id="cmu-1-small-region", **OPTIONS)
    box = _check_against_prediction(polygons, prediction)
    assert box[:, 0].min() >= 0 and box[:, 0].max() <= 2220 and box[:, 1].max() <= 2967
    # the JSON answer carries the same prediction, unrounded
    status, body = server.wsi("smile", "cmu-1-small-region", "json", size=(2220, 2967))
    summary = json.loads(body)["annotations"][0]["prediction"]
    assert summary["probability"] == pytest.approx(prediction.probability, abs=1e-6)
    assert summary["n_patches"] == prediction.n_patches
    assert re.fullmatch(r"[0-9a-f]{16}", summary["model_fingerprint"])  # the cache key's model part


def test_dsa_on_a_demo_slide_and_a_sub_region(server, cohort, tmp_path):
    image = cohort["demo"].stem
    status, body = server.wsi("smile", image, "dsa", size=(4096, 4096))
    assert status == 200, body[:500]
    from scripts.workflows.predict import predict_slide

    prediction = predict_slide(cohort["demo"], cohort["cv"], tmp_path / "api", slide_id=image, **OPTIONS)
    _check_against_prediction(_dsa(body), prediction)
    # a viewer's region: only the patches whose corner lies in it, tiers still ranked over the whole slide
    region = (512, 256, 768, 1024)
    status, body = server.wsi("smile", image, "dsa", location=region[:2], size=region[2:], tile_size=(512, 512))
    assert status == 200, body[:500]
    _check_against_prediction(_dsa(body), prediction, region=region, merged=False)  # 512-px tiles: little to merge


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, shared_slides):
    cases = [
        (("nosuchmodel", "cmu-1-small-region"), 404, "no model 'nosuchmodel'"),
        (("smile", "no-such-image"), 404, "not in this server's studies folder"),
        (("smile", str(shared_slides / "cmu-1-small-region.svs")), 404, "not in this server's studies folder"),
        (("smile", "broken"), 422, "cannot be read as a whole-slide image"),
        (("smile", "tcga-cr-7395-01a-01-ts1"), 422, '"mpp"'),
    ]
    for (model, image), code, text in cases:
        status, body = server.wsi(model, image, "asap")
        detail = json.loads(body)["detail"]
        assert status == code and text in detail, (model, image, status, detail)
        assert "\n" not in detail and "Traceback" not in detail
    assert server.process.poll() is None
    status, body = server.wsi("smile", "cmu-1-small-region", "asap", size=(1024, 1024))
    assert status == 200 and _asap(body)
