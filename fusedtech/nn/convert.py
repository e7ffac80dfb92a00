"""convert_model: swap torch.nn modules in a model for their fused drop-ins, in place.

Each fused module class offers ``from_torch(module)``, which returns a fused module sharing the
torch module's parameters and buffers (same device, dtype and train/eval mode); `_replacements`
lists them, class by class.
"""
from __future__ import annotations

import operator
import re
from collections import Counter

import torch
import torch.fx

from .adapters import ACTIVATIONS as _ACTIVATIONS
from .adapters import activation_kind, convert_foreign



def _replacements():
    """(torch class, fused drop-in) pairs, exact types only (fusedtech.nn imports this module, so the
    table is built on first use)."""
    from . import batchnorm, dropout, normalization as norm
    return ((torch.nn.LayerNorm, norm.LayerNorm), (torch.nn.RMSNorm, norm.RMSNorm),
            (torch.nn.BatchNorm1d, batchnorm.BatchNorm1d), (torch.nn.BatchNorm2d, batchnorm.BatchNorm2d),
            (torch.nn.GroupNorm, norm.GroupNorm), (torch.nn.InstanceNorm1d, norm.InstanceNorm1d),
            (torch.nn.InstanceNorm2d, norm.InstanceNorm2d), (torch.nn.InstanceNorm3d, norm.InstanceNorm3d),
            (torch.nn.Dropout, dropout.Dropout))


def _foldable_norm(module, fnn, include) -> bool:
    """A norm an activation after it can fold into: BatchNorm2d (-> BatchNormAct2d), GroupNorm (->
    GroupNormAct), torch's or fusedtech's drop-in, where `include` names the torch class."""
    for torch_cls, fused_cls in ((torch.nn.BatchNorm2d, fnn.BatchNorm2d), (torch.nn.GroupNorm, fnn.GroupNorm)):
        if type(module) in (torch_cls, fused_cls):
            return include is None or torch_cls in include
    return False


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
        fused = self.__dict__["_fused_into"]
        if self.__dict__["_parent"]._modules.get(self._bn_name) is fused and fused.fold_intact():
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
    for torch_cls, _ in _replacements():
        if cls is torch_cls:
            return "not in include" if include is not None and torch_cls not in include else None
        if isinstance(module, torch_cls):
            # Only exact classes are swapped: a subclass may compute something else, and swapping
            # on a guess would change the model silently.
            overrides = cls.forward is not torch_cls.forward
            return (f"subclass of nn.{torch_cls.__name__} "
                    + ("overriding forward with code convert_model does not know" if overrides
                       else "(only the exact torch class is swapped)"))
    # By name only modules without children: a container (timm's ConvNormAct, a classifier head
    # with a norm) is not a norm itself, and its children are looked at one by one.
    if isinstance(module, _NORM_BASES) or (_NORM_NAME.search(cls.__name__) and not module._modules):
        return "no fused drop-in for this class"
    return None


def _fold(fnn, bn_at, act_at, between, replaced):
    """Folds the activation standing at act_at = (owner, name) into the BatchNorm2d or GroupNorm at
    bn_at: the norm becomes a BatchNormAct2d or GroupNormAct, the activation a FoldedActivation. The fold remembers what stood
    at act_at and at each (owner, name) of the identities `between`, and undoes itself once any of
    them is replaced there (not submodules of the norm: that would be a cycle of modules)."""
    (bn_owner, bn_name), (act_owner, act_name) = bn_at, act_at
    act, norm = act_owner._modules[act_name], bn_owner._modules[bn_name]
    if isinstance(norm, torch.nn.GroupNorm):
        fused = fnn.GroupNormAct.from_group_norm(norm, activation_kind(act))
    else:
        fused = fnn.BatchNormAct2d.from_batch_norm(norm, activation_kind(act))
    bn_owner._modules[bn_name] = fused
    placeholder = act_owner._modules[act_name] = FoldedActivation(act, bn_owner, bn_name)
    fused.__dict__["_folded_from"] = ((act_owner, act_name, placeholder),) + tuple(
        (owner, name, owner._modules[name]) for owner, name in between)
    replaced[f"{type(norm).__name__}+{type(act).__name__}"] += 1


class _ChildrenAsLeaves(torch.fx.Tracer):
    """Traces one module's own forward with every submodule a leaf: the graph says whose output feeds
    whom, and nothing inside the submodules has to trace."""

    def is_leaf_module(self, m, module_qualified_name):
        return True


# Activations written as function calls: a pair ending in one cannot be folded in place (the call
# is in the model's code, not a module convert_model can swap), so the report says so.
_FUNCTIONAL_ACTIVATIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.silu, torch.nn.functional.gelu,
                           torch.relu_, "relu", "relu_"}


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _fold_traced(model, fnn, replaced, skipped, include):
    """Folds the BatchNorm2d -> activation pairs that a module's forward calls in a row (as in
    `self.act1(self.bn1(x))`, nn.Identity children between allowed), found by tracing with torch.fx
    each module that holds a BatchNorm2d; each pair it finds but cannot fold is reported with why."""
    for prefix, parent in list(model.named_modules()):
        if isinstance(parent, torch.nn.Sequential) or not any(_foldable_norm(c, fnn, include) for c in parent.children()):
            continue

        def report(target, what, reason):
            name = f"{prefix}.{target}" if prefix and target else (prefix or target)
            skipped.append({"module": name, "type": what, "reason": reason})

        try:
            graph = _ChildrenAsLeaves().trace(parent)
        except Exception as error:  # noqa: BLE001 - any failure to trace means: no pairs found here
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            report("", type(parent).__qualname__,
                   f"activations not folded: its forward does not trace with torch.fx ({type(error).__name__}: "
                   f"{message[:120]})")
            continue
        calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
        for node in list(graph.nodes):
            if node.op != "call_module" or not _foldable_norm(bn := parent.get_submodule(node.target), fnn, include):
                continue
            between, last = [], node
            while len(last.users) == 1:
                nxt = next(iter(last.users))
                if (nxt.op != "call_module" or type(parent.get_submodule(nxt.target)) is not torch.nn.Identity
                        or calls[nxt.target] != 1):
                    break
                between.append(nxt)
                last = nxt
            users = list(last.users)
            acts = [u for u in users if u.op == "call_module" and type(parent.get_submodule(u.target)) in _ACTIVATIONS]
            funcs = [u for u in users if u.op in ("call_function", "call_method") and u.target in _FUNCTIONAL_ACTIVATIONS]
            residual = [u for u in users if u.op == "call_function" and u.target in (operator.add, operator.iadd)]
            if residual and len(users) == 1 and len(residual[0].users) == 1:
                after = next(iter(residual[0].users))
                if after.op == "call_module" and type(parent.get_submodule(after.target)) in _ACTIVATIONS:
                    report(node.target, type(bn).__name__,
                           f"not folded with {after.target}: a residual add stands between them (in the model's code, "
                           "BatchNormAct2d(x, residual) does norm, add and activation in one op)")
                    continue
            if funcs and not acts:
                report(node.target, type(bn).__name__, "not folded: the activation after it is a function call "
                       f"({getattr(funcs[0].target, '__name__', funcs[0].target)}), not a module")
                continue
            if not acts:
                continue
            act_node = acts[0]
            act = parent.get_submodule(act_node.target)
            reason = None
            if len(users) != 1:
                reason = "its output is also used elsewhere than the activation"
            elif calls[node.target] != 1:
                reason = f"forward calls this {type(bn).__name__} more than once"
            elif calls[act_node.target] != 1:
                reason = f"forward calls the activation {act_node.target} more than once (shared by several inputs)"
            elif activation_kind(act) is None:
                reason = "GELU's tanh approximation has no fused form"
            elif len(act_node.args) != 1 or act_node.kwargs:
                reason = "the activation is called with more than its input"
            elif _has_hooks(bn) or _has_hooks(act) or any(_has_hooks(parent.get_submodule(n.target)) for n in between):
                reason = "hooks on it or on its activation would see a different module boundary"
            if reason is not None:
                report(node.target, type(bn).__name__, f"not folded with {act_node.target}: {reason}")
                continue

            def place(target):  # (the module owning `target`, its name there)
                owner_name, _, name = target.rpartition(".")
                return (parent.get_submodule(owner_name) if owner_name else parent), name

            _fold(fnn, place(node.target), place(act_node.target), [place(n.target) for n in between], replaced)


def _format_table(report) -> str:
    rows = [(kind, str(n), "replaced") for kind, n in report["replaced"].items()]
    rows += [(f"{s['module'] or '<model>'} ({s['type']})", "-", s["reason"]) for s in report["skipped"]]
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
    "type": its class, "reason": why}; verbose=True prints it as a table. The norms of timm (BatchNormAct2d, LayerNorm,
    LayerNorm2d) and HF Transformers (the LlamaRMSNorm, GemmaRMSNorm and T5LayerNorm forms and their
    copies) are swapped too, each for a stand-in computing with the same casts (nn/adapters.py);
    `include` may name their classes. With fuse_activations, a BatchNorm2d or GroupNorm followed by ReLU, GELU
    (tanh approximation excluded) or SiLU, in an nn.Sequential or called in a row by a module's
    forward (found by tracing that forward with torch.fx; nn.Identity children between allowed),
    becomes one BatchNormAct2d or GroupNormAct and the activation a FoldedActivation (an nn.Identity; state_dict keys stay the
    same), which applies the activation again should the BatchNormAct2d be swapped out later (by
    nn.SyncBatchNorm.convert_sync_batchnorm, say: it makes a plain SyncBatchNorm of it; convert to
    SyncBatchNorm first to keep a sync norm, which convert_model leaves alone); the BatchNormAct2d
    stops activating if the placeholder is replaced. Folding moves a module boundary: hooks on the
    BatchNorm see the activated output, and a slice of the Sequential that ends at the BatchNorm
    (model[:k]) still activates. `include`, when given, must name nn.BatchNorm2d / nn.GroupNorm for the folding."""
    from .. import nn as fnn
    replaced: Counter = Counter()
    skipped: list = []

    def fused_class(module):
        for torch_cls, cls in _replacements():
            if type(module) is torch_cls and (include is None or torch_cls in include):
                return cls
        return None

    if fuse_activations and (include is None or torch.nn.BatchNorm2d in include or torch.nn.GroupNorm in include):
        for prefix, parent in list(model.named_modules()):
            if not isinstance(parent, torch.nn.Sequential):
                continue
            names = list(parent._modules)
            for a, b in zip(names, names[1:]):
                bn, act = parent._modules[a], parent._modules[b]
                if not _foldable_norm(bn, fnn, include) or type(act) not in _ACTIVATIONS:
                    continue
                if activation_kind(act) is None:
                    skipped.append({"module": f"{prefix}.{b}" if prefix else b, "type": type(act).__name__,
                                    "reason": "not folded: GELU's tanh approximation has no fused form"})
                    continue
                _fold(fnn, (parent, a), (parent, b), [], replaced)
        _fold_traced(model, fnn, replaced, skipped, include)
    for prefix, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            cls = fused_class(child)
            foreign = convert_foreign(child) if cls is None and (include is None or type(child) in include) else None
            if cls is not None:
                setattr(parent, child_name, cls.from_torch(child))
                replaced[type(child).__name__] += 1
            elif foreign is not None:
                fused, label = foreign
                if fused is not None:
                    setattr(parent, child_name, fused)
                    replaced[label] += 1
                else:
                    skipped.append({"module": f"{prefix}.{child_name}" if prefix else child_name,
                                    "type": type(child).__qualname__, "reason": label})
            elif (reason := _skip_reason(child, include)) is not None:
                skipped.append({"module": f"{prefix}.{child_name}" if prefix else child_name,
                                "type": type(child).__qualname__, "reason": reason})
    # The model itself may be one of the replaced types (convert_model(nn.LayerNorm(h))): it cannot
    # change type in place, so the fused module that shares its parameters is what comes back.
    root_cls = fused_class(model)
    foreign = convert_foreign(model) if root_cls is None and (include is None or type(model) in include) else None
    if root_cls is not None:
        replaced[type(model).__name__] += 1
        model = root_cls.from_torch(model)
    elif foreign is not None:
        if foreign[0] is not None:
            replaced[foreign[1]] += 1
            model = foreign[0]
        else:
            skipped.append({"module": "", "type": type(model).__qualname__, "reason": foreign[1]})
    elif (reason := _skip_reason(model, include)) is not None:
        skipped.append({"module": "", "type": type(model).__qualname__, "reason": reason})
    report = {"replaced": dict(replaced), "skipped": skipped}
    if verbose:
        print(_format_table(report))
    return (model, report) if return_report else model
