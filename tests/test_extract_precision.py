"""Extraction ``precision`` option (bf16 autocast / fp32), stamped into the feature files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from test_extract import make_cohort, run_workflow  # noqa: E402 (helpers of the extraction tests)

from scripts.networks.encoders import build_encoder, resolve_precision


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return build_encoder("ctranspath", weights=tmp_path_factory.mktemp("w") / "absent.pth", allow_random_weights=True)


def _read(out):
    with h5py.File(out / "features" / "s0.h5", "r") as h5:
        return h5["features"][()], h5.attrs["precision"]


def test_precision_is_stamped_and_switching_extracts_again(tmp_path, encoder):
    datalist, out = make_cohort(tmp_path, 1)
    assert [r["status"] for r in run_workflow(datalist, out, encoder, batch_size=3, precision="fp32")] == ["ok"]
    fp32, stamp = _read(out)
    assert stamp == "fp32"
    run_workflow(datalist, out, encoder, batch_size=3, precision="bf16")  # the fp32 file is not reused
    bf16, stamp = _read(out)
    assert stamp == "bf16" and bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() > 0.98 and not np.array_equal(fp32, bf16)  # bf16 autocast really ran, and is close


def test_precision_values():
    assert resolve_precision("auto", "cuda") == "bf16" and resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("BF16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", "cpu")


def test_benchmark_reports_bf16_vs_fp32(shared_slides, encoder):
    import torch

    from scripts.benchmarks.extract import bench_precision

    slide = shared_slides / "cmu-1-small-region.svs"
    before = encoder.precision
    d = bench_precision(encoder, torch.device("cpu"), slide, n_patches=4, batch_size=4)
    assert d["n_patches"] == 4 and 0.9 < d["cosine_min"] <= d["cosine_mean"] <= 1.0
    assert 0.0 < d["rel_l2_mean"] <= d["rel_l2_max"] < 0.5 and d["max_rel"] > 0.0
    assert encoder.precision == before  # restored


def test_inference_features_use_the_extraction_precision(tmp_path):
    """``--precision`` on configs/inference.json reaches the features made during inference (and the
    declared encoder preprocessing is the one used)."""
    from monai.bundle import ConfigParser

    from scripts.data.datalist import load_datalist

    datalist, out = make_cohort(tmp_path, 1)
    parser = ConfigParser()
    parser.read_config("configs/inference.json")
    parser.update({"output_dir": str(out), "precision": "bf16", "num_workers": 0, "allow_random_weights": True,
                   "encoder_weights": str(tmp_path / "absent.pth")})
    stage = parser.get_parsed_content("feature_stage")
    assert stage.options["encoder_transform"] is not None
    record = load_datalist(datalist, require_labels=False)[0]
    feature_file, _ = stage(record, out / "patches" / "s0.h5")
    bf16, stamp = _read(out)
    assert stamp == "bf16" and feature_file == out / "features" / "s0.h5" and len(bf16) > 0
