"""convert_model: swap torch.nn modules in a model for their fused drop-ins, in place.

Each fused module class offers ``from_torch(module)``, which returns a fused module sharing the
torch module's parameters and buffers (same device, dtype and train/eval mode). The table below is
looked up at call time, so module types whose fused class does not exist yet are left alone.
"""
from __future__ import annotations

import re
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


# Module kinds a report lists when they stay unconverted, so a model whose norms were all skipped
# says so rather than reporting an empty "replaced" (classes of other libraries are known by name only).
_NORM_BASES = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm,
               torch.nn.LocalResponseNorm, torch.nn.modules.dropout._DropoutNd)
_NORM_NAME = re.compile(r"(Norm|Dropout)", re.IGNORECASE)


def _skip_reason(module, include):
    """Why convert_model leaves `module` as it is, or None where it is nothing convert_model looks for."""
    cls = type(module)
    if cls.__module__.startswith("fusedtech."):
        return None
    for torch_cls, _ in _REPLACEMENTS:
        if cls is torch_cls:
            return "not in include" if include is not None and torch_cls not in include else None
        if isinstance(module, torch_cls):
            # Only exact classes are swapped: a subclass may compute something else, and swapping
            # on a guess would change the model silently.
            overrides = cls.forward is not torch_cls.forward
            return (f"subclass of nn.{torch_cls.__name__} "
                    + ("overriding forward with code convert_model does not know" if overrides
                       else "(only the exact torch class is swapped)"))
    if isinstance(module, _NORM_BASES) or _NORM_NAME.search(cls.__name__):
        return "no fused drop-in for this class"
    return None


def _format_table(report) -> str:
    rows = [(kind, str(n), "replaced") for kind, n in report["replaced"].items()]
    rows += [(f"{s['module'] or '<model>'} ({s['type']})", "-", s["reason"]) for s in report["skipped"]]
    rows += [(name, "-", "no fused version yet") for name in report["not_fused_yet"]]
    if not rows:
        return "fusedtech.nn.convert_model: nothing to replace"
    header = ("module", "count", "result")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(2)]
    lines = ["fusedtech.nn.convert_model:", f"  {header[0]:<{widths[0]}}  {header[1]:>{widths[1]}}  {header[2]}"]
    lines += [f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def convert_model(model: torch.nn.Module, *, include=None, fuse_activations: bool = False, verbose: bool = False,
                  return_report: bool = False):
    """Replace, in place, every module with a fused drop-in (exact type match, so subclasses and
    already-fused modules stay); `include` limits it to some torch classes (e.g. {nn.LayerNorm}).
    Returns the model, as torch's converters (nn.SyncBatchNorm.convert_sync_batchnorm) do: the same
    object unless it is itself a replaced module (then the fused module sharing its parameters and
    buffers); with return_report=True, (model, report). The report's "replaced" counts replaced
    modules per type, "skipped" lists each norm or dropout left alone as {"module": its name,
    "type": its class, "reason": why}, "not_fused_yet" the torch types seen that have no fused
    version yet; verbose=True prints it as a table. With fuse_activations, a BatchNorm2d followed by
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
    skipped: list = []

    def fused_class(module):
        for torch_cls, name in _REPLACEMENTS:
            if type(module) is torch_cls and (include is None or torch_cls in include):
                cls = getattr(fnn, name, None)
                if cls is None:
                    missing.add(torch_cls.__name__)
                return cls
        return None

    if fuse_activations and (include is None or torch.nn.BatchNorm2d in include):
        for prefix, parent in list(model.named_modules()):
            if not isinstance(parent, torch.nn.Sequential):
                continue
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                bn, act = parent._modules[a], parent._modules[b]
                kind = _ACTIVATIONS.get(type(act))
                if type(bn) not in (torch.nn.BatchNorm2d, fnn.BatchNorm2d) or kind is None:
                    continue
                if getattr(act, "approximate", "none") != "none":
                    skipped.append({"module": f"{prefix}.{b}" if prefix else b, "type": type(act).__name__,
                                    "reason": "not folded: GELU's tanh approximation has no fused form"})
                    continue
                fused = parent._modules[a] = fnn.BatchNormAct2d.from_batch_norm(bn, kind)
                placeholder = parent._modules[b] = FoldedActivation(act, parent, a)
                # Not a submodule (a cycle): the BatchNormAct2d stops activating should the
                # placeholder be replaced (parent[b] = nn.Identity(), another activation).
                fused.__dict__["_folded_from"] = (parent, b, placeholder)
                replaced[f"BatchNorm2d+{type(act).__name__}"] += 1
    for prefix, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            cls = fused_class(child)
            if cls is not None:
                setattr(parent, child_name, cls.from_torch(child))
                replaced[type(child).__name__] += 1
            elif (reason := _skip_reason(child, include)) is not None:
                skipped.append({"module": f"{prefix}.{child_name}" if prefix else child_name,
                                "type": type(child).__qualname__, "reason": reason})
    # The model itself may be one of the replaced types (convert_model(nn.LayerNorm(h))): it cannot
    # change type in place, so the fused module that shares its parameters is what comes back.
    root_cls = fused_class(model)
    if root_cls is not None:
        replaced[type(model).__name__] += 1
        model = root_cls.from_torch(model)
    elif (reason := _skip_reason(model, include)) is not None:
        skipped.append({"module": "", "type": type(model).__qualname__, "reason": reason})
    report = {"replaced": dict(replaced), "skipped": skipped, "not_fused_yet": sorted(missing)}
    if verbose:
        print(_format_table(report))
    return (model, report) if return_report else model
