"""One switch for the MIL method: a registered network name plus its settings, with per-method defaults.

Configs build networks through :func:`build_method` so that every registered method (``smile``, the
baselines of ``docs/baselines.md``, ``smile_adaptive``) trains with the same workflow::

    "network_def": {"_target_": "scripts.networks.methods.build_method", "_mode_": "callable",
                    "name": "smile", "threshold": null, "factor": null, "network_kwargs": {}}

Rules, applied in this order:

1. the network class's own constructor defaults (SMILE: embed 256, attention 128, threshold 0.5,
   factor 0.5, the official values);
2. :data:`METHOD_DEFAULTS` (empty today: every network already defaults to its paper's values; put a
   deliberate per-method change here, in one place);
3. ``network_kwargs`` (a dict; any argument of the chosen network);
4. named keyword arguments that are not ``None`` (``--network_def#factor 0.3`` on the command line).

A ``None`` value means "this method's default", so ``train.json`` can carry SMILE's knobs
(``threshold``, ``factor``, ...) as ``null`` and still build ``clam_sb`` with ``--network_def#name
clam_sb``. A value the chosen network does not accept is an error that names the accepted arguments
(never silently dropped).

The built network remembers its resolved arguments (``model.config``), so checkpoints written by
:func:`scripts.formats.checkpoints.save_checkpoint` record it (:func:`network_spec`) and
:func:`build_from_checkpoint` rebuilds it. (The file format is :mod:`scripts.formats.checkpoints`; building
a network from it is here, so formats never import networks.)
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from scripts.formats.checkpoints import CheckpointError, load_state, mil_of, plain_value, read_checkpoint
from scripts.networks.bag_classifier import BagClassifier
from scripts.networks.registry import MIL_NETWORKS, build_mil_network

# Deliberate per-method changes of a network's constructor defaults (name -> kwargs). Empty: each
# network's defaults are its paper's values (docs/baselines.md).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {}


# the comparison's default order (scripts.experiments.compare)
DEFAULT_METHODS = (
    "smile", "smile_adaptive", "abmil", "abmil_gated", "clam_sb", "clam_mb", "transmil", "dsmil", "dtfd", "acmil",
    "mean_pool", "max_pool",
)  # fmt: skip


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(MIL_NETWORKS)


def method_arguments(name: str) -> dict[str, Any]:
    """The constructor arguments of method ``name`` with their defaults (after :data:`METHOD_DEFAULTS`)."""
    out, _ = _accepted_arguments(_network_class(name))
    out.update(METHOD_DEFAULTS.get(name, {}))
    return out


def resolve_method_kwargs(name: str, network_kwargs: Mapping[str, Any] | None = None, **kwargs) -> dict[str, Any]:
    """The keyword arguments :func:`build_method` passes to the network (``None`` values dropped)."""
    cls = _network_class(name)
    resolved = dict(METHOD_DEFAULTS.get(name, {}))
    if network_kwargs:
        if not isinstance(network_kwargs, Mapping):
            raise TypeError(f"network_kwargs must be a dict of {name} arguments, got {type(network_kwargs).__name__}")
        resolved.update(network_kwargs)
    resolved.update({k: v for k, v in kwargs.items() if v is not None})
    accepted, takes_any = _accepted_arguments(cls)
    unknown = [k for k in resolved if k not in accepted]
    if unknown and not takes_any:
        raise TypeError(
            f"method {name!r} does not take {', '.join(repr(k) for k in unknown)}; it takes: {', '.join(accepted)}. "
            f"Set them to null (= the method's default) in the config, or None on the command line "
            f"(e.g. --network_def#{unknown[0]} None)."
        )
    return resolved


def build_method(name: str = "smile", in_dim: int | None = None, network_kwargs: Mapping[str, Any] | None = None, **kwargs) -> nn.Module:
    """Build method ``name`` (see the module docstring for how arguments combine); ``in_dim`` = feature size."""
    resolved = resolve_method_kwargs(name, network_kwargs, **kwargs)
    if in_dim is not None:
        resolved["in_dim"] = int(in_dim)
    model = _network_class(name)(**resolved)
    if not hasattr(model, "config"):
        # remembered for checkpoints: network_spec (below) reads model.config
        model.config = {**method_arguments(name), **resolved}
    return model


def build_bag_classifier(
    name: str = "smile", in_dim: int | None = None, network_kwargs: Mapping[str, Any] | None = None,
    channel_first: bool = True, **kwargs,
) -> nn.Module:
    """:func:`build_method` wrapped in :class:`~scripts.networks.bag_classifier.BagClassifier`: one bag
    ``(B, C, N)`` in, one logit ``(B, 1)`` out. It is ``network_def`` of ``configs/train.json`` (the same
    module type as ``network_def`` of ``configs/inference.json``); training runs its ``.mil`` network on
    packed bags."""
    return BagClassifier(build_method(name, in_dim=in_dim, network_kwargs=network_kwargs, **kwargs), channel_first=channel_first)


def method_factory(name: str, network_kwargs: Mapping[str, Any] | None = None, **kwargs):
    """``factory(in_dim=D) -> network`` for :func:`scripts.workflows.training.run_cross_validation`; arguments are
    checked now, so a typo fails before any training starts."""
    resolve_method_kwargs(name, network_kwargs, **kwargs)
    return functools.partial(build_method, name, network_kwargs=dict(network_kwargs or {}), **kwargs)


NETWORK_DEF_FIXED = ("name", "in_dim", "network_kwargs", "channel_first")


def method_config_overrides(name: str, network_kwargs: Mapping[str, Any] | None = None,
                            network_def: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Config overrides (``network_def#...``) that make ``train.json``'s ``network_def`` build method
    ``name`` with exactly ``network_kwargs``: the comparison's, the ablation's and the transfer's way of
    choosing the network of a fold trained by :func:`scripts.workflows.training.train_from_config`.

    ``network_def`` (the config's ``network_def`` item) names the knobs it carries (``embed_dim``,
    ``threshold``, ``factor``, ...): each is set to its value in ``network_kwargs`` or to null (= the
    method's default, whatever ``--network_def#...`` said); the other arguments go to
    ``network_def#network_kwargs`` (all of them when ``network_def`` is None). The arguments are checked now (:func:`resolve_method_kwargs`), so
    a typo fails before any training.
    """
    kwargs = dict(network_kwargs or {})
    resolve_method_kwargs(name, kwargs)
    named = [k for k in (network_def or {}) if not str(k).startswith("_") and k not in NETWORK_DEF_FIXED]
    out: dict[str, Any] = {"network_def#name": name}
    out.update({f"network_def#{k}": kwargs.get(k) for k in named})
    out["network_def#network_kwargs"] = {k: v for k, v in kwargs.items() if k not in named}
    return out


def count_parameters(name: str, in_dim: int, network_kwargs: Mapping[str, Any] | None = None) -> int:
    """Trainable parameters of method ``name`` at feature size ``in_dim``."""
    model = build_method(name, in_dim=in_dim, network_kwargs=network_kwargs)
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _accepted_arguments(cls: type) -> tuple[dict[str, Any], bool]:
    """Keyword arguments ``cls(...)`` accepts (name -> default), following ``**kwargs`` that a subclass
    passes on to its base class; and whether anything is accepted (a ``**kwargs`` that is not passed on)."""
    accepted: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        for p in params:
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                accepted.setdefault(p.name, None if p.default is inspect.Parameter.empty else p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return accepted, False
    return accepted, True


def _network_class(name: str) -> type[nn.Module]:
    if not isinstance(name, str) or name not in MIL_NETWORKS:
        raise KeyError(f"unknown MIL method {name!r}; registered: {', '.join(sorted(MIL_NETWORKS))}")
    return MIL_NETWORKS[name]


def resolve_methods(methods: Sequence[str] | str) -> list[str]:
    """Method names as a checked list (a comma-separated string is accepted); ``"all"`` = every
    registered method (:data:`DEFAULT_METHODS` order first)."""
    if isinstance(methods, str):
        if methods.strip() == "all":
            methods = [m for m in DEFAULT_METHODS if m in available_methods()]
            methods += [m for m in available_methods() if m not in methods]
        else:
            methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods))
    if not methods:
        raise ValueError("no methods to compare; e.g. --methods \"['smile','abmil_gated']\"")
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise KeyError(f"unknown method(s) {', '.join(unknown)}; registered: {', '.join(available_methods())}")
    return methods




# ------------------------------------------------------------------------------------------------ checkpoints
def network_spec(model: nn.Module, network_factory: Any = None, in_dim: int | None = None) -> dict:
    """``{"name", "class", "kwargs"}`` rebuilding ``model`` with :func:`scripts.networks.build_mil_network`
    (``model`` may be wrapped in DDP or :class:`~scripts.networks.bag_classifier.BagClassifier`). The
    kwargs are ``model.config`` (set by :func:`scripts.networks.methods.build_method`); for a network without one,
    the keywords of a ``functools.partial`` factory plus ``in_dim``."""
    model = mil_of(model)
    name = next((n for n, cls in MIL_NETWORKS.items() if type(model) is cls), None)
    if isinstance(getattr(model, "config", None), Mapping):
        kwargs = dict(model.config)
    else:
        kwargs = {}
        if isinstance(network_factory, functools.partial):
            kwargs = dict(network_factory.keywords)
            if name is None and network_factory.args:
                name = network_factory.args[0]
            kwargs.pop("name", None)
        if in_dim is not None:
            kwargs.setdefault("in_dim", in_dim)
    return {"name": name, "class": f"{type(model).__module__}.{type(model).__qualname__}", "kwargs": plain_value(kwargs)}


def build_from_checkpoint(path: str | Path, device: Any = "cpu", trust: bool | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the MIL network a fold checkpoint describes; returns (model in eval mode, checkpoint)."""
    checkpoint = read_checkpoint(path, trust)
    spec = checkpoint.get("network") or {}
    if not spec.get("name"):
        raise CheckpointError(f"{path}: no network name; load it into network_def (load_into_network) instead")
    model = build_mil_network(spec["name"], **dict(spec.get("kwargs") or {}))
    load_state(model, checkpoint["model"], path)
    return model.to(device).eval(), checkpoint


__all__ = [
    "DEFAULT_METHODS", "resolve_methods",
    "METHOD_DEFAULTS", "available_methods", "method_arguments", "resolve_method_kwargs", "build_method",
    "build_bag_classifier", "method_factory", "method_config_overrides", "count_parameters", "network_spec",
    "build_from_checkpoint",
]  # fmt: skip
