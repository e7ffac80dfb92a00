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


class FoldedActivation(torch.nn.Identity):
    """What stands where an activation was folded into the BatchNormAct2d before it: the identity
    while that module is still there; the activation again if it was swapped out since (as
    nn.SyncBatchNorm.convert_sync_batchnorm swaps every BatchNorm for a plain SyncBatchNorm), so
    the model computes the same function either way."""

    def __init__(self, activation: torch.nn.Module, parent: torch.nn.Module, bn_name: str):
        super().__init__()
        self.activation = activation  # a child: moves with .to(), prints in repr; it has no state
        # The parent is not a child (that would be a cycle of modules): kept outside _modules.
        self.__dict__["_parent"], self._bn_name = parent, bn_name
        self.__dict__["_fused_into"] = parent._modules[bn_name]

    def forward(self, input):
        if self.__dict__["_parent"]._modules.get(self._bn_name) is self.__dict__["_fused_into"]:
            return input
        return self.activation(input)


def convert_model(model: torch.nn.Module, *, include=None, fuse_activations: bool = False, verbose: bool = False):
    """Replace, in place, every module with a fused drop-in (exact type match, so subclasses and
    already-fused modules stay); `include` limits it to some torch classes (e.g. {nn.LayerNorm}).
    Returns (model, report): model is the same object unless it is itself a replaced module (then
    the fused module sharing its parameters and buffers); report counts replaced modules per type and lists the torch module
    types seen that have no fused version yet. With fuse_activations, a BatchNorm2d followed by
    ReLU, GELU (tanh approximation excluded) or SiLU in an nn.Sequential becomes one
    BatchNormAct2d and the activation a FoldedActivation (an nn.Identity; state_dict keys stay the
    same), which applies the activation again should the BatchNormAct2d be swapped out later (by
    nn.SyncBatchNorm.convert_sync_batchnorm, say: it makes a plain SyncBatchNorm of it; convert to
    SyncBatchNorm first to keep a sync norm, which convert_model leaves alone); the BatchNormAct2d
    stops activating if the placeholder is replaced. Folding moves a module boundary: hooks on the
    BatchNorm see the activated output, and a slice of the Sequential that ends at the BatchNorm
    (model[:k]) still activates. `include`, when given, must name nn.BatchNorm2d for the folding."""
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

    if fuse_activations and (include is None or torch.nn.BatchNorm2d in include):
        for parent in list(model.modules()):
            if not isinstance(parent, torch.nn.Sequential):
                continue
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                bn, act = parent._modules[a], parent._modules[b]
                kind = _ACTIVATIONS.get(type(act))
                if type(bn) in (torch.nn.BatchNorm2d, fnn.BatchNorm2d) and kind and getattr(act, "approximate", "none") == "none":
                    fused = parent._modules[a] = fnn.BatchNormAct2d.from_batch_norm(bn, kind)
                    placeholder = parent._modules[b] = FoldedActivation(act, parent, a)
                    # Not a submodule (a cycle): the BatchNormAct2d stops activating should the
                    # placeholder be replaced (parent[b] = nn.Identity(), another activation).
                    fused.__dict__["_folded_from"] = (parent, b, placeholder)
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
