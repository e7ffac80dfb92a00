"""convert_model: swap torch.nn modules in a model for their fused drop-ins, in place.

Each fused module class offers ``from_torch(module)``, which returns a fused module sharing the
torch module's parameters and buffers (same device, dtype and train/eval mode). The table below is
looked up at call time, so module types whose fused class does not exist yet are left alone.
"""
from __future__ import annotations

from collections import Counter

import torch

# torch class -> name of the fused class in fusedtech.nn
_REPLACEMENTS = (
    (torch.nn.LayerNorm, "LayerNorm"),
    (torch.nn.RMSNorm, "RMSNorm"),
    (torch.nn.BatchNorm1d, "BatchNorm1d"),
    (torch.nn.BatchNorm2d, "BatchNorm2d"),
    (torch.nn.Dropout, "Dropout"),
)


_ACTIVATIONS = {torch.nn.ReLU: "relu", torch.nn.GELU: "gelu", torch.nn.SiLU: "silu"}


def convert_model(model: torch.nn.Module, *, include=None, fuse_activations: bool = False, verbose: bool = False):
    """Replace, in place, every module with a fused drop-in (exact type match, so subclasses and
    already-fused modules stay); `include` limits it to some torch classes (e.g. {nn.LayerNorm}).
    Returns (model, report): model is the same object unless it is itself a replaced module (then
    the fused module sharing its parameters and buffers); report counts replaced modules per type and lists the torch module
    types seen that have no fused version yet. With fuse_activations, a BatchNorm2d followed by
    ReLU, GELU (tanh approximation excluded) or SiLU in an nn.Sequential becomes one
    BatchNormAct2d and the activation an Identity (state_dict keys stay the same)."""
    from .. import nn as fnn
    replaced: Counter = Counter()
    missing: set = set()

    def fused_class(module):
        for torch_cls, name in _REPLACEMENTS:
            if type(module) is torch_cls and (include is None or torch_cls in include):
                cls = getattr(fnn, name, None)
                if cls is None:
                    missing.add(torch_cls.__name__)
                return cls
        return None

    if fuse_activations:
        for parent in list(model.modules()):
            if not isinstance(parent, torch.nn.Sequential):
                continue
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                bn, act = parent._modules[a], parent._modules[b]
                kind = _ACTIVATIONS.get(type(act))
                if type(bn) in (torch.nn.BatchNorm2d, fnn.BatchNorm2d) and kind and getattr(act, "approximate", "none") == "none":
                    parent._modules[a] = fnn.BatchNormAct2d.from_batch_norm(bn, kind)
                    parent._modules[b] = torch.nn.Identity()
                    replaced[f"BatchNorm2d+{type(act).__name__}"] += 1
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            cls = fused_class(child)
            if cls is not None:
                setattr(parent, child_name, cls.from_torch(child))
                replaced[type(child).__name__] += 1
    # The model itself may be one of the replaced types (convert_model(nn.LayerNorm(h))): it cannot
    # change type in place, so the fused module that shares its parameters is what comes back.
    root_cls = fused_class(model)
    if root_cls is not None:
        replaced[type(model).__name__] += 1
        model = root_cls.from_torch(model)
    report = {"replaced": dict(replaced), "not_fused_yet": sorted(missing)}
    if verbose:
        print(f"fusedtech.nn.convert_model: replaced {dict(replaced) or 'nothing'}"
              + (f"; no fused version yet for {sorted(missing)}" if missing else ""))
    return model, report
