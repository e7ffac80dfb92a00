"""Fused stand-ins for the norm classes of timm and HF Transformers, and the recognition that
convert_model uses to swap them: a class is taken only when its name is a known one (HF: its
forward's code is one of the known forms, compared as syntax trees) and its parameters, buffers and
children are the expected ones; anything else is left alone with the reason. Neither library is
imported here: a model holding their modules has imported them already.

Each stand-in computes with the same casts and in the same order as the class it replaces:
- HF's "llama" form (LlamaRMSNorm and its copies: Mistral, Qwen2/3, Mixtral, ...): normalise in
  float32, cast back to the input's dtype, then multiply by the weight in the weight's and the
  input's promoted dtype (so a bf16 model rounds twice, as HF does; float32 runs in one fused op).
- HF's "gemma" form: normalise in float32, multiply by (1 + weight) in float32, cast back once.
- HF's "t5" form (T5LayerNorm): normalise in float32, cast to the weight's dtype when that is fp16
  or bf16, multiply by the weight.
Inputs of other dtypes (float64) run the same form in torch's ops.
"""
from __future__ import annotations

import ast
import inspect
import sys
import textwrap

import torch

from . import functional as F
from .batchnorm import BatchNormAct2d
from .normalization import GroupNorm, GroupNormAct, LayerNorm, LayerNorm2d, share_state

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _code(source: str, name: str | None = None) -> str:
    """A function's code as a syntax tree dump: no comments, docstring, annotations or decorators."""
    tree = ast.parse(textwrap.dedent(source))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and (name is None or n.name == name))
    fn.decorator_list, fn.returns = [], None
    for arg in fn.args.args + fn.args.kwonlyargs:
        arg.annotation = None
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    return "\n".join([fn.name, ast.dump(fn.args)] + [ast.dump(statement) for statement in body])


# The HF RMSNorm forms, as HF writes them (argument names included: a renamed copy is another form).
_HF_FORMS = {
    "llama": ({"forward": """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
"""}, "variance_epsilon"),
    "gemma": ({"_norm": """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
""", "forward": """
def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
"""}, "eps"),
    "t5": ({"forward": """
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
"""}, "variance_epsilon"),
}
_HF_CODE: dict = {}  # _HF_FORMS parsed, on first use


def _hf_code():
    if not _HF_CODE:
        _HF_CODE.update({form: ({name: _code(src) for name, src in methods.items()}, eps)
                         for form, (methods, eps) in _HF_FORMS.items()})
    return _HF_CODE


def _method_code(cls, name):
    fn = getattr(cls, name, None)
    try:
        return _code(inspect.getsource(fn), name)
    except (TypeError, OSError, SyntaxError, StopIteration):
        return None


def _hf_form(cls):
    """The known form whose every method `cls` defines with the same code, or None (cached per class)."""
    cached = _HF_FORM_CACHE.get(cls, _MISSING)
    if cached is _MISSING:
        cached = next((form for form, (methods, _) in _hf_code().items()
                       if all(_method_code(cls, name) == code for name, code in methods.items())), None)
        _HF_FORM_CACHE[cls] = cached
    return cached


_HF_FORM_CACHE: dict = {}
_MISSING = object()


def _hf_rms_norm(form, x, weight, eps):
    """The three forms as HF computes them, in torch's ops (what dtypes the kernels do not take run)."""
    if form == "gemma":
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).type_as(x)
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    if form == "llama":
        return weight * (x.to(torch.float32) * torch.rsqrt(variance + eps)).to(x.dtype)
    normed = x * torch.rsqrt(variance + eps)
    return weight * (normed.to(weight.dtype) if weight.dtype in (torch.float16, torch.bfloat16) else normed)


class TransformersRMSNorm(torch.nn.Module):
    """A fused stand-in for an HF Transformers RMSNorm class of a known form ("llama", "gemma" or
    "t5"; module docstring): it keeps the module's attributes (weight, its epsilon's name), so the
    state_dict and the code that reads them are unchanged."""

    form: str
    eps_attribute: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        eps = float(getattr(self, self.eps_attribute))
        if x.dtype not in _KERNEL_DTYPES or weight.dtype not in _KERNEL_DTYPES:
            return _hf_rms_norm(self.form, x, weight, eps)
        shape = (x.shape[-1],)
        if self.form == "gemma":
            return F.rms_norm(x, shape, 1.0 + weight.float(), eps).type_as(x)
        if self.form == "llama":
            if x.dtype == torch.float32 and weight.dtype == torch.float32:
                return F.rms_norm(x, shape, weight, eps)
            return weight * F.rms_norm(x, shape, None, eps).to(x.dtype)
        # t5: the normalised input is float32 (x times a float32 factor) until cast to a half weight's dtype
        if weight.dtype in (torch.float16, torch.bfloat16):
            normed = F.rms_norm(x if x.dtype == weight.dtype else x.float(), shape, None, eps)
            return weight * normed.to(weight.dtype)
        return F.rms_norm(x.float(), shape, weight, eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={getattr(self, self.eps_attribute)}, form={self.form}"


class TimmBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNormAct2d (batch norm, then its `drop`, then its `act` child), fused: the
    activation runs inside the norm when `drop` is an identity and `act` one the kernels have
    (ReLU, SiLU, exact GELU, identity); otherwise the norm is fused and `drop` and `act` run after
    it, as timm runs them. The children are looked at on every call, so replacing one later works."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        drop, act = self._modules["drop"], self._modules["act"]
        kind = activation_kind(act) if type(drop) is torch.nn.Identity else None
        if kind is not None:
            return self._normalize(input, kind)
        return act(drop(self._normalize(input, "none")))

    def extra_repr(self):
        return torch.nn.BatchNorm2d.extra_repr(self)


class TimmGroupNormAct(GroupNormAct):
    """timm's GroupNormAct and GroupNorm1Act (group norm, then `drop`, then `act`), fused as
    TimmBatchNormAct2d is: the activation inside the norm when `drop` is an identity and `act` one the
    kernels have, else the norm fused and `drop`, `act` after it; the children looked at on every call."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        drop, act = self._modules["drop"], self._modules["act"]
        kind = activation_kind(act) if type(drop) is torch.nn.Identity else None
        y = F.group_norm_act(input, self.num_groups, self.weight, self.bias, self.eps, activation=kind or "none")
        return y if kind is not None else act(drop(y))

    def extra_repr(self):
        return torch.nn.GroupNorm.extra_repr(self)


# The activation modules the fused BatchNormAct2d computes, by the kernels' name for them.
ACTIVATIONS = {torch.nn.ReLU: "relu", torch.nn.GELU: "gelu", torch.nn.SiLU: "silu"}


def activation_kind(act) -> str | None:
    """The fused kernels' name for activation module `act`, or None where they have no such activation."""
    if type(act) is torch.nn.Identity:
        return "none"
    kind = ACTIVATIONS.get(type(act))
    return None if kind == "gelu" and act.approximate != "none" else kind


def _timm_class(module_name: str, qualname: str):
    mod = sys.modules.get(module_name)
    return getattr(mod, qualname, None) if mod is not None else None


def _only_params(module, names) -> bool:
    return set(module._parameters) <= set(names) and not module._buffers


def convert_foreign(module):
    """(fused module, label) for a timm / HF norm we know, (None, reason) for one we recognise but
    leave alone, or None where `module` is none of them."""
    cls = type(module)
    owner = cls.__module__
    if owner.startswith("timm."):
        if cls is _timm_class("timm.layers.norm_act", "BatchNormAct2d"):
            if set(module._modules) != {"drop", "act"}:
                return None, "timm BatchNormAct2d without its drop and act children"
            return share_state(TimmBatchNormAct2d, module), "timm.BatchNormAct2d"
        for name in ("GroupNormAct", "GroupNorm1Act"):
            if cls is _timm_class("timm.layers.norm_act", name):
                if set(module._modules) != {"drop", "act"}:
                    return None, f"timm {name} without its drop and act children"
                if getattr(module, "_fast_norm", False):
                    return None, (f"timm {name} in fast-norm mode (it normalises in the autocast dtype): "
                                  "no fused form with those casts")
                return share_state(TimmGroupNormAct, module), f"timm.{name}"
        for name, fused in (("LayerNorm", LayerNorm), ("LayerNorm2d", LayerNorm2d), ("GroupNorm", GroupNorm),
                            ("GroupNorm1", GroupNorm)):
            if cls is _timm_class("timm.layers.norm", name):
                if getattr(module, "_fast_norm", False):
                    return None, (f"timm {name} in fast-norm mode (it normalises in the autocast dtype): "
                                  "no fused form with those casts")
                return share_state(fused, module), f"timm.{name}"
        return None
    if owner.startswith("transformers.") and cls.__name__.endswith(("RMSNorm", "LayerNorm")):
        form = _hf_form(cls)
        if form is None:
            return None, "HF norm class whose forward is none of the known RMSNorm forms (llama, gemma, t5)"
        eps_attribute = _hf_code()[form][1]
        weight = module._parameters.get("weight")
        if (weight is None or weight.dim() != 1 or not _only_params(module, ("weight",)) or module._modules
                or not isinstance(getattr(module, eps_attribute, None), (int, float))):
            return None, f"HF {form}-form RMSNorm without the expected weight, {eps_attribute} and no children"
        fused = share_state(TransformersRMSNorm, module)
        fused.form, fused.eps_attribute = form, eps_attribute
        return fused, f"transformers.{cls.__name__}"
    return None
