"""Publish a trained model as the bundle's ``models/model.pt`` (the state_dict of ``network_def``).

    python -m scripts.workflows.publish_model --checkpoint <train_out>/cv/model.pt [--out models/model.pt]
    python -m monai.bundle run publish --config_file configs/train.json --output_dir <train_out>   # the same

``<train_out>/cv/model.pt`` is the cross-validation fold with the best validation AUC (written by the
training workflow); any ``fold<k>/model.pt`` works too. The checkpoint's network must be the one that
``network_def`` in ``configs/inference.json`` builds (same class and settings); otherwise this stops
and says which setting differs, because a state_dict does not carry SMILE's threshold and factor.
Afterwards the Model Zoo tools work on the bundle::

    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \
        --meta_file configs/metadata.json --config_file configs/inference.json

Inference can still average all folds (``--checkpoints <train_out>/cv``); ``models/model.pt`` is the
single model that a Model Zoo user downloads.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.bundle import ConfigParser

from scripts.formats.checkpoints import CheckpointError, load_into_network, publish_state_dict

logger = logging.getLogger(__name__)


def build_network_def(config_file: str | Path = "configs/inference.json", bundle_root: str | Path = "."):
    """``network_def`` of a bundle config, as ``monai.bundle`` builds it."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(bundle_root)
    return parser.get_parsed_content("network_def")


def publish_model(
    checkpoint: str | Path,
    out: str | Path = "models/model.pt",
    config_file: str | Path = "configs/inference.json",
    bundle_root: str | Path = ".",
    trust: bool | None = None,
) -> Path:
    """Load a training checkpoint into ``network_def`` (strictly) and save that network's state_dict."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist; run training first "
                              "(configs/train.json writes <output_dir>/cv/model.pt)")
    net = build_network_def(config_file, bundle_root)
    model, info = load_into_network(checkpoint, net, trust)
    out = publish_state_dict(model, out, {"source": str(checkpoint), **info})
    logger.info("published %s -> %s", checkpoint, out)
    return out


def main(checkpoint: str, out: str = "models/model.pt", config_file: str = "configs/inference.json",
         trust_checkpoint: bool = False) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = publish_model(checkpoint, out, config_file, trust=bool(trust_checkpoint) or None)
    print(f"wrote {path} (state_dict of network_def in {config_file})")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
