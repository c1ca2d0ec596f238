"""The MONAI Model Zoo's own bundle checks (ci/verify_bundle.py in Project-MONAI/model-zoo), run here.

* required files (configs/metadata.json, LICENSE) and preferred ones (configs/inference.json,
  docs/README.md; models/model.pt is produced by training + scripts.workflows.publish_model, so the test makes one);
* metadata: the fields the Model Zoo schema requires, the version listed in the changelog;
* ``verify_net_in_out`` on ``network_def`` with the metadata's input description;
* ``ckpt_export`` to TorchScript through the real command line, and the exported module reproduces the
  network's output;
* workflow properties: ``create_workflow(..., workflow_type="infer"/"train").check_properties()``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("scripts.networks.smile")

META = "configs/metadata.json"
INFER = "configs/inference.json"
# fields required by the Model Zoo metadata schema (meta_schema_20240725.json)
SCHEMA_REQUIRED = ("version", "changelog", "monai_version", "pytorch_version", "numpy_version",
                   "required_packages_version", "task", "description", "authors", "copyright",
                   "network_data_format")


@pytest.fixture()
def in_bundle(bundle_root, monkeypatch):
    monkeypatch.chdir(bundle_root)
    return bundle_root


def test_files_and_metadata(in_bundle):
    for required in (META, "LICENSE"):
        assert (in_bundle / required).is_file(), f"Model Zoo requires {required}"
    for preferred in (INFER, "docs/README.md"):
        assert (in_bundle / preferred).is_file(), f"Model Zoo prefers {preferred}"
    meta = json.loads((in_bundle / META).read_text())
    missing = [k for k in SCHEMA_REQUIRED if k not in meta]
    assert not missing, f"metadata lacks {missing}"
    assert meta["version"] in meta["changelog"], "the current version must have a changelog entry"
    image = meta["network_data_format"]["inputs"]["image"]  # monai.bundle reads inputs#image
    assert image["num_channels"] == 768 and image["spatial_shape"] == ["*"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 1


def test_net_in_out_and_torchscript_export(in_bundle, tmp_path):
    import warnings

    from monai.bundle import ConfigParser, verify_net_in_out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (1, 37):  # the bag size is free ("*")
            verify_net_in_out(net_id="network_def", meta_file=META, config_file=INFER, any=n, device="cpu")

    # a training checkpoint, published as models/model.pt would be (scripts.workflows.publish_model)
    from scripts.networks.smile import SMILE
    from scripts.workflows.publish_model import publish_model

    torch.manual_seed(0)
    trained = SMILE(in_dim=768)
    train_ckpt = tmp_path / "train_model.pt"
    torch.save({"model": trained.state_dict(), "network": {"name": "smile", "class": "scripts.networks.smile.SMILE",
                                                            "kwargs": trained.config}, "threshold": 0.42}, train_ckpt)
    ckpt = publish_model(train_ckpt, out=tmp_path / "model.pt", config_file=INFER)
    assert json.loads((tmp_path / "model_info.json").read_text())["threshold"] == 0.42
    parser = ConfigParser()
    parser.read_config(INFER)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(ckpt, weights_only=True))  # strictly: exactly network_def's state_dict
    with torch.no_grad():
        bag = torch.rand(30, 768)
        torch.testing.assert_close(net(bag.T.unsqueeze(0)).reshape(1), trained.eval()(bag))
    # a model trained with other SMILE settings is refused (a state_dict does not carry them)
    other = SMILE(in_dim=768, factor=0.3)
    torch.save({"model": other.state_dict(), "network": {"name": "smile", "kwargs": other.config}}, tmp_path / "o.pt")
    with pytest.raises(ValueError, match="factor"):
        publish_model(tmp_path / "o.pt", out=tmp_path / "o_model.pt", config_file=INFER)
    ts = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
           "--ckpt_file", str(ckpt), "--meta_file", META, "--config_file", INFER]
    env = dict(os.environ, PYTHONPATH=str(in_bundle))
    proc = subprocess.run(cmd, cwd=in_bundle, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = {"metadata.json": ""}
    loaded = torch.jit.load(str(ts), _extra_files=extra)
    embedded = json.loads(extra["metadata.json"])  # the metadata a Model Zoo user sees: the real package list
    assert embedded["required_packages_version"] == json.loads((in_bundle / META).read_text())["required_packages_version"]
    assert "openslide-python" in embedded["required_packages_version"] and "h5py" in embedded["required_packages_version"]
    bag = torch.rand(1, 768, 50)
    with torch.no_grad():
        torch.testing.assert_close(loaded(bag), net(bag), rtol=1e-5, atol=1e-6)
        logits, attention = loaded.forward_with_attention(bag)
    assert attention.shape == (1, 50)


def _missing_properties(config_file, workflow_type, **overrides):
    import warnings

    from monai.bundle import create_workflow

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow = create_workflow(config_file=config_file, meta_file=META, workflow_type=workflow_type, **overrides)
        return workflow.check_properties()


def test_infer_workflow_properties(in_bundle):
    """The infer properties of configs/inference.json alone (check_properties builds the evaluator, so its
    reader, tissue, patch-grid and encoder blocks are all resolved)."""
    assert _missing_properties(INFER, "infer") == []


def test_train_workflow_properties(in_bundle, tmp_path):
    """The train properties are resolved (hasattr builds them), so they get a small real feature cohort."""
    import csv

    import h5py
    import numpy as np

    train = in_bundle / "configs" / "train.json"
    if not train.is_file():
        pytest.skip("configs/train.json not in this checkout yet")
    rng = np.random.default_rng(0)
    with open(tmp_path / "datalist.csv", "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["slide_id", "path", "label", "patient_id", "center", "features"])
        for i in range(4):
            with h5py.File(tmp_path / f"s{i}.h5", "w") as h5:
                h5["features"] = rng.standard_normal((5, 768)).astype(np.float32)
                h5["coords"] = np.zeros((5, 2), np.int64)
            w.writerow([f"s{i}", "", i % 2, f"p{i}", "c", f"s{i}.h5"])
    missing = _missing_properties(str(train), "train", datalist=str(tmp_path / "datalist.csv"),
                                  output_dir=str(tmp_path / "out"))
    assert missing == [], (
        f"configs/train.json lacks Model Zoo train properties {missing}: it needs ids dataset_dir, "
        "train#dataset, train#inferer, train#trainer (with max_epochs)")


def test_metadata_against_schema_and_requirements(in_bundle, tmp_path):
    """verify_metadata (jsonschema) with the offline schema copy; every pinned runtime package listed."""
    import shutil

    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    schema = tmp_path / "eval" / "schema.json"  # where the Model Zoo CI puts the downloaded schema
    schema.parent.mkdir()
    shutil.copyfile(in_bundle / "tests" / "data" / "meta_schema.json", schema)
    verify_metadata(meta_file=META, filepath=str(schema))  # raises on a schema violation

    meta = json.loads((in_bundle / META).read_text())
    assert "optional_packages_version" not in meta  # deprecated: MONAI copies it over the required list
    pinned = {}
    for line in (in_bundle / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name] = version
    assert meta["pytorch_version"] == pinned.pop("torch") and meta["monai_version"] == pinned.pop("monai")
    assert meta["numpy_version"] == pinned.pop("numpy")
    assert meta["required_packages_version"] == pinned
    out = meta["network_data_format"]["outputs"]["pred"]
    assert "logit" in out["type"] and "logit" in out["format"]  # the network returns a logit, not a probability


def test_large_files_lists_the_published_model(in_bundle):
    import yaml

    files = yaml.safe_load((in_bundle / "large_files.yml").read_text())["large_files"]
    assert [f["path"] for f in files] == ["models/model.pt"]
    assert {"url", "hash_val", "hash_type"} <= set(files[0])
