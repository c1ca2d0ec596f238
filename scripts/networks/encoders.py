"""Patch encoders by name: each with its own network, weights loader and preprocessing.

Built in:
  ``ctranspath``        CTransPath (Swin-T + conv stem), 768-d, released ``ctranspath.pth`` (TransPath)
  ``chief_ctranspath``  the same network with CHIEF's released weights (``CHIEF_CTransPath.pth``)
  ``resnet50_trunc``    ImageNet ResNet-50 cut after layer 3 + average pooling, 1024-d (as CLAM uses);
                        weights: torchvision's ``resnet50`` state_dict (layer4/fc keys are ignored)
  ``timm:<model>``      any timm model name (``num_classes=0``), preprocessing from timm's pretrained
                        config of that model, weights from a local state_dict file

Weights always come from a local file, never from a hub. ``build_encoder(...,
allow_random_weights=True)`` runs without a file (seeded random weights, for demos and tests) and the
returned ``Encoder.weights_sha256`` is then the string ``"random"``, which every output must carry.
Add an encoder with ``register_encoder(EncoderSpec(...))``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet50

from scripts.networks.ctranspath import (
    CTRANSPATH_WEIGHTS_HELP,
    WeightsError,
    build_ctranspath,
    extract_state_dict,
    load_checkpoint_file,
    load_ctranspath_state_dict,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    build: Callable[[], nn.Module]  # the network with random weights
    load_weights: Callable[[nn.Module, object, str], None]  # (model, loaded checkpoint, source name)
    feature_dim: int
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    default_weights: str = ""
    weights_help: str = ""


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    ENCODERS[spec.name] = spec
    return spec


@dataclass
class Encoder:
    """A frozen encoder ready to run: ``encoder(uint8 (B,H,W,3) tensor) -> (B, feature_dim) float32``."""

    name: str
    model: nn.Module
    feature_dim: int
    input_size: int
    mean: tuple
    std: tuple
    weights_sha256: str
    weights_path: str = ""
    precision: str = "auto"  # "bf16" (autocast), "fp32", or "auto" (bf16 on CUDA, fp32 elsewhere)
    _norm: dict = field(default_factory=dict, repr=False)

    def resolved_precision(self, device_type: str) -> str:
        """``bf16`` or ``fp32``: what :meth:`__call__` runs with on ``device_type``."""
        return resolve_precision(self.precision, device_type)

    @property
    def random_weights(self) -> bool:
        return self.weights_sha256 == RANDOM_WEIGHTS

    def to(self, device) -> "Encoder":
        self.model.to(device)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, S, S): scale to [0, 1], resize to the input size
        (antialiased bilinear, as torchvision's Resize on a PIL image), normalise."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        key = (x.device, x.dtype)
        if key not in self._norm:
            self._norm[key] = (torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1),
                               torch.tensor(self.std, device=x.device).view(1, 3, 1, 1))
        mean, std = self._norm[key]
        return (x - mean) / std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.preprocess(images))

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of an already preprocessed float batch (B, 3, S, S) (:meth:`preprocess`, or the
        extraction config's ``encoder_transform``), in the chosen precision, as float32."""
        if self.resolved_precision(x.device.type) == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                out = self.model(x)
        else:
            out = self.model(x)
        return out.float()


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str | None, device_type: str) -> str:
    """``"bf16"`` or ``"fp32"`` for an extraction ``precision`` option (``auto``: bf16 on CUDA, else fp32)."""
    value = "auto" if precision in (None, "") else str(precision).lower()
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if value == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return value


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def get_encoder_spec(name: str) -> EncoderSpec:
    if name in ENCODERS:
        return ENCODERS[name]
    if name.startswith("timm:"):
        return _timm_spec(name[len("timm:"):])
    raise KeyError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)} or 'timm:<any timm model name>'")


def build_encoder(
    name: str = "ctranspath",
    weights: str | Path | None = None,
    allow_random_weights: bool = False,
    seed: int = 0,
    input_size: int | None = None,
    mean: tuple | None = None,
    std: tuple | None = None,
) -> Encoder:
    """Build a frozen, eval-mode encoder by name with weights from a local file.

    Args:
        name: a registered encoder name or ``timm:<model>``.
        weights: local weights file; None or "" uses the encoder's default path (models/...).
        allow_random_weights: when the weights file is absent, use seeded random weights instead of
            failing (demo and tests only: the features are meaningless). Outputs then say "random".
        seed: seed for random weights (same seed, same network, same features).
        input_size, mean, std: override the encoder's preprocessing.

    Raises:
        WeightsError: the weights file is missing (saying where the weights are published and where to
            put them) or does not fit the network (naming the keys).
    """
    spec = get_encoder_spec(name)
    path = Path(weights) if weights not in (None, "") else (Path(spec.default_weights) if spec.default_weights else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = spec.build()
    if path is not None and path.is_file():
        spec.load_weights(model, load_checkpoint_file(path, spec.weights_help), str(path))
        sha = sha256_of(path)
        logger.info("encoder %s: weights %s (sha256 %s...)", name, path, sha[:12])
    elif allow_random_weights:
        sha = RANDOM_WEIGHTS
        logger.warning(
            "encoder %s: RANDOM weights (seed %d; %s not found) - features are meaningless; outputs are "
            "stamped weights_sha256=random", name, seed, path if path else "no weights file given")
    else:
        where = f"encoder weights file {path} not found." if path else "no encoder weights file given."
        raise WeightsError(f"{where} {spec.weights_help or 'Pass --encoder_weights <local file>.'}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Encoder(
        name=name, model=model, feature_dim=spec.feature_dim,
        input_size=int(input_size or spec.input_size),
        mean=tuple(mean or spec.mean), std=tuple(std or spec.std),
        weights_sha256=sha, weights_path=str(path) if sha != RANDOM_WEIGHTS and path else "",
    )


# ----------------------------------------------------------------------------------- registrations
register_encoder(EncoderSpec(
    name="ctranspath", build=build_ctranspath, load_weights=load_ctranspath_state_dict, feature_dim=768,
    default_weights="models/ctranspath.pth", weights_help=CTRANSPATH_WEIGHTS_HELP,
))
register_encoder(EncoderSpec(
    name="chief_ctranspath", build=build_ctranspath, load_weights=load_ctranspath_state_dict, feature_dim=768,
    default_weights="models/CHIEF_CTransPath.pth",
    weights_help=CTRANSPATH_WEIGHTS_HELP.replace("models/ctranspath.pth", "models/CHIEF_CTransPath.pth"),
))


class ResNet50Trunc(nn.Module):
    """torchvision ResNet-50 up to layer 3, then global average pooling: (N, 1024). Submodule names match
    torchvision's state_dict so its ImageNet weights load directly."""

    def __init__(self):
        super().__init__()

        full = resnet50(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = full.conv1, full.bn1, full.relu, full.maxpool
        self.layer1, self.layer2, self.layer3 = full.layer1, full.layer2, full.layer3

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _load_strict(model: nn.Module, checkpoint, source: str, ignore_prefixes: tuple = ()) -> None:
    sd = extract_state_dict(checkpoint)
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"{source} does not fit {type(model).__name__}: missing keys ({len(missing)}): {missing[:50]}; "
            f"unexpected keys ({len(unexpected)}): {unexpected[:50]}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise WeightsError(f"{source} does not fit {type(model).__name__}: {exc}") from exc


register_encoder(EncoderSpec(
    name="resnet50_trunc", build=ResNet50Trunc,
    load_weights=lambda m, ckpt, src: _load_strict(m, ckpt, src, ignore_prefixes=("layer4.", "fc.")),
    feature_dim=1024, default_weights="models/resnet50.pth",
    weights_help=("ResNet-50 ImageNet weights are not downloaded by this bundle: save torchvision's "
                  "`resnet50` ImageNet state_dict (https://download.pytorch.org/models/resnet50-19c8e357.pth) "
                  "as models/resnet50.pth (or pass --encoder_weights <path>)."),
))


def _timm_spec(model_name: str) -> EncoderSpec:
    if model_name not in timm.list_models():
        raise KeyError(f"timm has no model named {model_name!r} (timm.list_models() lists them)")

    def build():
        return timm.create_model(model_name, pretrained=False, num_classes=0)

    probe = timm.create_model(model_name, pretrained=False, num_classes=0)
    cfg = timm.data.resolve_data_config({}, model=probe)
    classifier = probe.pretrained_cfg.get("classifier", "head")
    classifiers = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    return EncoderSpec(
        name=f"timm:{model_name}", build=build,
        load_weights=lambda m, ckpt, src: _load_strict(m, ckpt, src, ignore_prefixes=classifiers),
        feature_dim=int(probe.num_features), input_size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        weights_help=f"timm model {model_name}: pass --encoder_weights <local state_dict file> (never downloaded).",
    )
