"""SMILE: gated-attention MIL whose strongest attention logits are damped before the softmax.

Architecture (as in the official ``STAS_MIL`` of panliangrui/IJCAI25, ``model/STAS_MILP.py``):

1. instance embedding ``BatchNorm1d(in_dim) -> Linear(in_dim, embed_dim) -> ReLU``. Two options (off by
   default, so the default is the official network) give the embedding of Ilse et al.'s classic-MIL
   networks: ``hidden_dims`` inserts ``Linear -> ReLU`` layers before the last one (e.g. ``[256, 128]``
   with ``embed_dim=64``: in_dim -> 256 -> 128 -> 64), ``input_norm="none"`` drops the input BatchNorm
   (for inputs standardised beforehand), and ``embed_dropout`` adds dropout after each embedding layer;
2. gated attention: ``sigmoid(W_a h) * tanh(W_b h)`` (hidden ``attention_dim``) then ``Linear(attention_dim, 1)``:
   one raw attention logit ``s_i`` per instance;
3. *scale-aware damping*: within each bag the raw logits are min-max normalised,
   ``u_i = (s_i - min s) / (max s - min s)``; every logit with ``u_i > threshold`` (strict) is multiplied
   by ``factor``. A one-instance bag or a bag with equal logits has no spread (the official code divides
   0 by 0 there, and ``NaN > threshold`` is False): nothing is scaled, no NaN appears;
4. softmax of the (damped) logits within the bag, attention-weighted sum of the embeddings;
5. ``Linear(embed_dim, 1)``: one logit per bag (STAS present), trained with ``BCEWithLogitsLoss``.
   (The official head has two outputs followed by a sigmoid and is trained with cross-entropy on those
   sigmoid outputs; this bundle does not copy that. :meth:`SMILE.from_official_state_dict` still loads
   its weights: the single logit is the official head's second row.)

Note on the sign: the factor multiplies the *raw* logit. For ``0 < factor < 1`` a large positive logit
shrinks towards 0 (its attention drops), but a logit that is negative and still above the threshold
(possible when all logits of a bag are negative) moves *up* towards 0, so its attention rises. This is
the official behaviour and is kept on purpose.

With ``factor=1.0`` the damping is the identity and SMILE is exactly gated attention MIL (Ilse et al.
2018) with this embedding; the damping step runs in training and in evaluation, as in the official code.

Bags are packed: ``x`` (M, D) holds the instances of all bags and ``bag_index`` (M,) says which bag each
belongs to. BatchNorm therefore sees exactly the real instances of the batch (as the official code,
which packs graphs the same way), and every per-bag reduction is a scatter operation: no Python loop
over bags.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from scripts.networks.base import MILNetwork
from scripts.networks.registry import register_mil_network
from scripts.networks.segment_ops import segment_max, segment_min, segment_softmax, segment_sum


def damp_top_logits(
    logits: torch.Tensor, bag_index: torch.Tensor, n_bags: int, threshold: float, factor: float
) -> torch.Tensor:
    """Multiply the logits whose within-bag min-max normalised value is > ``threshold`` by ``factor``.

    ``logits`` is (M,). Bags without spread (one instance, equal logits) are left unchanged. The scaling
    mask carries no gradient (it is a comparison); the gradient flows through the scaled logits.
    """
    if factor == 1.0:
        return logits
    detached = logits.detach()
    low = segment_min(detached, bag_index, n_bags)[bag_index]
    high = segment_max(detached, bag_index, n_bags)[bag_index]
    spread = high - low
    has_spread = spread > 0
    normalised = (detached - low) / torch.where(has_spread, spread, torch.ones_like(spread))
    scale = torch.where(has_spread & (normalised > threshold), torch.full_like(logits, factor), torch.ones_like(logits))
    return logits * scale


@register_mil_network("smile")
class SMILE(MILNetwork):
    """SMILE MIL head (one output logit per bag).

    Args:
        in_dim: instance feature size (768 for CTransPath; read it from the data).
        embed_dim: embedding size after ``Linear`` (official: 256).
        attention_dim: hidden size of the gated attention (official: 128).
        threshold: min-max normalised logits strictly above it are damped (official config: 0.5).
        factor: multiplier of the damped logits (official config: 0.5; its runs: 0.3); 1.0 = gated ABMIL.
        dropout: dropout on the bag embedding before the classifier (0 = none, as in the official code).
        hidden_dims: sizes of extra ``Linear -> ReLU`` embedding layers before the last ``Linear(.., embed_dim)``
            (default none: the official one-layer embedding).
        input_norm: ``"batchnorm"`` (official: ``BatchNorm1d(in_dim)`` on the raw features) or ``"none"``.
        embed_dropout: dropout after each embedding layer (0 = none, official).
    """

    def __init__(
        self,
        in_dim: int = 768,
        embed_dim: int = 256,
        attention_dim: int = 128,
        threshold: float = 0.5,
        factor: float = 0.5,
        dropout: float = 0.0,
        hidden_dims: Sequence[int] = (),
        input_norm: str = "batchnorm",
        embed_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_dim, self.embed_dim, self.attention_dim = int(in_dim), int(embed_dim), int(attention_dim)
        self.threshold, self.factor, self.dropout_p = float(threshold), float(factor), float(dropout)
        if isinstance(hidden_dims, (int, float)):
            hidden_dims = [hidden_dims]
        self.hidden_dims = [int(h) for h in hidden_dims or ()]
        if any(h < 1 for h in self.hidden_dims):
            raise ValueError(f"hidden_dims must be positive sizes, got {list(hidden_dims)}")
        if input_norm not in ("batchnorm", "none"):
            raise ValueError(f"input_norm must be 'batchnorm' or 'none', got {input_norm!r}")
        self.input_norm, self.embed_dropout_p = input_norm, float(embed_dropout)
        layers: list[nn.Module] = [nn.BatchNorm1d(self.in_dim)] if input_norm == "batchnorm" else []
        size = self.in_dim
        for out in [*self.hidden_dims, self.embed_dim]:
            layers += [nn.Linear(size, out), nn.ReLU()]
            if self.embed_dropout_p > 0:
                layers.append(nn.Dropout(self.embed_dropout_p))
            size = out
        # default (official): embed = Sequential(BatchNorm1d, Linear, ReLU), the names the official loader maps to
        self.embed = nn.Sequential(*layers)
        self.attention_gate = nn.Linear(self.embed_dim, self.attention_dim)  # sigmoid branch (official a_attention)
        self.attention_value = nn.Linear(self.embed_dim, self.attention_dim)  # tanh branch (official b_attention)
        self.attention_score = nn.Linear(self.attention_dim, 1)
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.classifier = nn.Linear(self.embed_dim, 1)
        embed_linears = [m for m in self.embed if isinstance(m, nn.Linear)]
        for layer in (*embed_linears, self.attention_gate, self.attention_value, self.attention_score):
            nn.init.xavier_normal_(layer.weight)  # the official initialisation

    @property
    def config(self) -> dict:
        """Constructor arguments: ``SMILE(**model.config)`` rebuilds the architecture."""
        return {
            "in_dim": self.in_dim,
            "embed_dim": self.embed_dim,
            "attention_dim": self.attention_dim,
            "threshold": self.threshold,
            "factor": self.factor,
            "dropout": self.dropout_p,
            "hidden_dims": list(self.hidden_dims),
            "input_norm": self.input_norm,
            "embed_dropout": self.embed_dropout_p,
        }

    def forward_packed(self, x: torch.Tensor, bag_index: torch.Tensor, n_bags: int) -> dict[str, torch.Tensor]:
        h = self.embed(x)  # (M, E)
        gated = torch.sigmoid(self.attention_gate(h)) * torch.tanh(self.attention_value(h))
        raw = self.attention_score(gated).squeeze(-1)  # (M,)
        damped = damp_top_logits(raw, bag_index, n_bags, self.threshold, self.factor)
        attention = segment_softmax(damped, bag_index, n_bags)  # (M,), sums to 1 per bag
        bag_embedding = segment_sum(attention.unsqueeze(-1) * h, bag_index, n_bags)  # (B, E)
        logits = self.classifier(self.dropout(bag_embedding)).squeeze(-1)  # (B,)
        return {"logits": logits, "attention": attention, "attention_logits": raw, "bag_embedding": bag_embedding}

    @classmethod
    def from_official_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], threshold: float = 0.5, factor: float = 0.5
    ) -> "SMILE":
        """Build a SMILE from a state_dict saved by the official ``STAS_MIL`` (two-output head).

        The official probability of STAS is ``sigmoid(classifier(z))[:, 1]``, so this network's single
        logit is the official classifier's row 1. Sizes are read from the weights. Use the threshold and
        factor the official model ran with (its ``add_margin`` flag off means ``factor=1.0``).
        """
        sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
        required = [
            "fc.0.weight", "fc.0.bias", "fc.0.running_mean", "fc.0.running_var", "fc.1.weight", "fc.1.bias",
            "Attention.a_attention.0.weight", "Attention.a_attention.0.bias",
            "Attention.b_attention.0.weight", "Attention.b_attention.0.bias",
            "Attention.linear.0.weight", "Attention.linear.0.bias", "classifier.0.weight", "classifier.0.bias",
        ]  # fmt: skip
        missing = [k for k in required if k not in sd]
        if missing:
            raise KeyError(f"not an official STAS_MIL state_dict: missing {', '.join(missing)}")
        head_w, head_b = sd["classifier.0.weight"], sd["classifier.0.bias"]
        if head_w.shape[0] != 2:
            raise ValueError(f"expected the official two-output classifier, got {head_w.shape[0]} outputs")
        embed_dim, in_dim = sd["fc.1.weight"].shape
        attention_dim = sd["Attention.a_attention.0.weight"].shape[0]
        model = cls(in_dim=in_dim, embed_dim=embed_dim, attention_dim=attention_dim, threshold=threshold, factor=factor)
        mine = {
            "embed.0.weight": sd["fc.0.weight"],
            "embed.0.bias": sd["fc.0.bias"],
            "embed.0.running_mean": sd["fc.0.running_mean"],
            "embed.0.running_var": sd["fc.0.running_var"],
            "embed.0.num_batches_tracked": sd.get("fc.0.num_batches_tracked", torch.tensor(0)),
            "embed.1.weight": sd["fc.1.weight"],
            "embed.1.bias": sd["fc.1.bias"],
            "attention_gate.weight": sd["Attention.a_attention.0.weight"],  # followed by Sigmoid there
            "attention_gate.bias": sd["Attention.a_attention.0.bias"],
            "attention_value.weight": sd["Attention.b_attention.0.weight"],  # followed by Tanh there
            "attention_value.bias": sd["Attention.b_attention.0.bias"],
            "attention_score.weight": sd["Attention.linear.0.weight"],
            "attention_score.bias": sd["Attention.linear.0.bias"],
            "classifier.weight": head_w[1:2],
            "classifier.bias": head_b[1:2],
        }
        model.load_state_dict(mine, strict=True)
        return model
