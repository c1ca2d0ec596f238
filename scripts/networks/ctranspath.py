"""CTransPath (Wang et al. 2022) on current timm: Swin-T with a convolutional stem, 768-d patch features.

The released weights (``ctranspath.pth`` from the TransPath README, and CHIEF's ``CHIEF_CTransPath.pth``)
were saved from timm 0.5.4. Two things changed in timm 1.x and are handled here:

* the stem is called with extra keyword arguments (``strict_img_size``, ``output_fmt``, ``device``, ...)
  and must return channels-last maps (B, H/4, W/4, C) instead of flattened tokens;
* each stage's patch-merging ("downsample") moved from the end of stage i to the start of stage i+1,
  and the ``relative_position_index`` / ``attn_mask`` buffers are no longer saved.

``load_ctranspath_state_dict`` converts the released layout and loads it strictly: any key that is
missing or left over is an error that names it. ``tests/test_ctranspath.py`` proves the result equals
the reference model built with timm 0.5.4 (package ``timm-ctp``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import timm
import torch
import torch.nn as nn

from scripts.formats.checkpoints import CheckpointError, UntrustedCheckpointError, load_weights_file
from scripts.utils.errors import BundleError

CTRANSPATH_FEATURE_DIM = 768

# Published locations of the weights; nothing in the bundle downloads them.
CTRANSPATH_WEIGHTS_HELP = (
    "CTransPath weights are not downloaded by this bundle. Get `ctranspath.pth` from the Google Drive link "
    "in the README of https://github.com/Xiyue-Wang/TransPath (or CHIEF's `CHIEF_CTransPath.pth`, published "
    "with https://github.com/hms-dbmi/CHIEF and its Hugging Face release) and put it at models/ctranspath.pth "
    "(or pass --encoder_weights <path>). For a dry run without weights pass --allow_random_weights true "
    "(features are then meaningless and every output is stamped weights_sha256=random)."
)

# Buffers that timm 0.5.4 saved but timm 1.x recomputes (non-persistent): dropped on load.
_RECOMPUTED_BUFFERS = ("relative_position_index", "attn_mask")


class WeightsError(BundleError, RuntimeError):
    """Encoder weights that are absent or do not fit the network; the message says why and what to do."""


class ConvStem(nn.Module):
    """CTransPath's stem: two 3x3 stride-2 conv+BN+ReLU (3->12->24 for Swin-T), a 1x1 conv to
    ``embed_dim``, then the norm layer. Accepts timm 1.x's keyword arguments and returns NHWC.

    Module names (``proj.0`` ... ``proj.6``, ``norm``) match the released checkpoint.
    """

    def __init__(
        self,
        img_size=224,
        patch_size=4,
        in_chans=3,
        embed_dim=96,
        norm_layer=None,
        flatten: bool = False,
        output_fmt: str | None = "NHWC",
        strict_img_size: bool = True,
        device=None,
        dtype=None,
        **unused,
    ):
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        patch_size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if patch_size != (4, 4):
            raise ValueError(f"CTransPath's convolutional stem downsamples by 4; got patch_size={patch_size}")
        if embed_dim % 8:
            raise ValueError(f"CTransPath's stem needs embed_dim divisible by 8; got {embed_dim}")
        if output_fmt not in (None, "NHWC", "NCHW", "NLC"):
            raise ValueError(f"unsupported output_fmt {output_fmt!r}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = (img_size[0] // 4, img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        # timm 0.5.4 code passed flatten=True implicitly (tokens); timm 1.x asks for NHWC explicitly
        self.output_fmt = "NLC" if (flatten and output_fmt is None) else (output_fmt or "NHWC")
        kw = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False, **kw),
                nn.BatchNorm2d(c_out, **kw),
                nn.ReLU(inplace=True),
            ]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1, **kw))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **kw) if norm_layer else nn.Identity()

    def set_input_size(self, img_size=None, patch_size=None):  # timm 1.x hook
        if patch_size is not None and tuple(patch_size if not isinstance(patch_size, int) else (patch_size,) * 2) != (4, 4):
            raise ValueError("CTransPath's convolutional stem has a fixed patch size of 4")
        if img_size is not None:
            self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"CTransPath expects {self.img_size[0]}x{self.img_size[1]} input, got {tuple(x.shape[-2:])}")
        x = self.proj(x)  # B C H W
        if self.output_fmt == "NCHW":
            return x if isinstance(self.norm, nn.Identity) else self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x.permute(0, 2, 3, 1)  # B H W C
        x = self.norm(x)
        if self.output_fmt == "NLC":
            x = x.flatten(1, 2)
        return x


def build_ctranspath() -> nn.Module:
    """CTransPath with random weights: (N, 3, 224, 224) ImageNet-normalised -> (N, 768)."""
    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, embed_layer=ConvStem, num_classes=0
    )


def extract_state_dict(checkpoint) -> dict:
    """The state_dict inside a loaded checkpoint: ``{"model": sd}`` (released format), ``{"state_dict": sd}``
    or a plain state_dict; a DataParallel/DDP ``module.`` prefix is removed."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"expected a dict / state_dict, got {type(checkpoint).__name__}")
    sd = checkpoint
    for key in ("model", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(
            "the checkpoint holds no state_dict (expected a dict of tensors, under 'model' as in the released "
            f"ctranspath.pth); top-level keys: {sorted(checkpoint)[:10]}"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def convert_reference_state_dict(sd: Mapping[str, torch.Tensor]) -> dict:
    """Map a timm-0.5.4 CTransPath state_dict to this model's layout.

    ``layers.i.downsample.*`` -> ``layers.{i+1}.downsample.*`` (only when the dict is in the old layout,
    recognised by ``layers.0.downsample``), recomputed buffers dropped, an empty/identity head removed.
    A dict already in the timm 1.x layout passes through unchanged (apart from the buffers).
    """
    old_layout = any(k.startswith("layers.0.downsample.") for k in sd)
    out = {}
    for key, value in sd.items():
        if key.rsplit(".", 1)[-1] in _RECOMPUTED_BUFFERS:
            continue
        if old_layout:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        out[key] = value
    return out


def load_ctranspath_state_dict(model: nn.Module, checkpoint, source: str = "checkpoint") -> None:
    """Load released CTransPath weights (or a plain / already-converted state_dict) strictly.

    Raises:
        WeightsError: naming every missing and unexpected key, and shape mismatches.
    """
    sd = convert_reference_state_dict(extract_state_dict(checkpoint))
    head_keys = [k for k in sd if k.startswith("head.")]
    if head_keys:
        raise WeightsError(
            f"{source}: CTransPath weights must be headless (the released file has no classifier); found {head_keys}"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shapes = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    if missing or unexpected or bad_shapes:
        parts = [f"{source} does not fit CTransPath (Swin-T + conv stem):"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if bad_shapes:
            parts.append(f"shape mismatches ({len(bad_shapes)}): {bad_shapes}")
        parts.append("Is this the CTransPath checkpoint (ctranspath.pth / CHIEF_CTransPath.pth)?")
        raise WeightsError(" ".join(parts))
    model.load_state_dict(sd, strict=True)


def load_checkpoint_file(path: str | Path, help_text: str = CTRANSPATH_WEIGHTS_HELP):
    """Load a local weights file on the CPU with ``weights_only=True`` (see
    :func:`scripts.formats.checkpoints.load_file`): a missing file is a WeightsError saying where to get
    it; a file holding pickled objects is refused unless ``--trust_checkpoint true``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"encoder weights file {path} not found. {help_text}")
    try:
        return load_weights_file(path, help_text)
    except UntrustedCheckpointError:
        raise
    except CheckpointError as exc:
        raise WeightsError(str(exc)) from exc


def ctranspath(weights: str | Path | None = None) -> nn.Module:
    """CTransPath in eval mode, with weights from a local file (None: random weights)."""
    model = build_ctranspath()
    if weights is not None:
        load_ctranspath_state_dict(model, load_checkpoint_file(weights), source=str(weights))
    return model.eval()
