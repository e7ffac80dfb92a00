"""What every fused optimizer does around its kernel: collect the parameters of a param group into
(device, dtype) buckets, one kernel call each; create state lazily in torch's layout; honour
GradScaler's contract (grad_scale / found_inf); keep fp32 master weights when asked.

The per-parameter Python loop here only gathers references (torch's own optimizers do the same in
``_init_group``); all arithmetic happens in one kernel call per bucket.
"""
from __future__ import annotations

import itertools
import operator
import types
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from .._distributed import is_distributed, local  # noqa: F401 - used as mt.local / mt.is_distributed

LOW_PRECISION = (torch.float16, torch.bfloat16)
NO_STATE = types.MappingProxyType({})  # the state of a parameter that has none (read-only, shared)
SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def dense(t: torch.Tensor) -> bool:
    """True if t's elements fill its storage span with no gaps or overlaps, in any dim order."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda s: s[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same element order in memory (tensors of one shape): strides agree on every dim of size
    > 1. Autograd may give a gradient any stride on a size-1 dim (a 1x1 conv's weight after a
    permuted input: (64, 1, 64, 64) for a (128, 64, 1, 1) parameter strided (64, 1, 1, 1))."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


@dataclass
class Bucket:
    params: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    originals: list = field(default_factory=list)  # the parameters themselves (params may hold copies)
    states: dict = field(default_factory=lambda: defaultdict(list))
    steps: list = field(default_factory=list)
    masters: list = field(default_factory=list)
    # (param, working copy) pairs for parameters that are not dense or whose gradient has other
    # strides: the kernel updates the copy and the copy is written back after it.
    writeback: list = field(default_factory=list)
    strides: list = field(default_factory=list)  # of the grads: a step with the same ones reuses the bucket
    momentum_buffers: Optional[list] = None  # SGD: the buffers of every parameter, once all exist
    distributed: bool = False  # some parameter is a DTensor: take local shards (else skip the calls)
    state_dicts: list = field(default_factory=list)  # optimizer.state[p] of each parameter
    state_refs: dict = field(default_factory=dict)  # key -> the state objects the bucket was built on


def fusable(p: torch.Tensor) -> bool:
    """The kernels take p: a float32/float16/bfloat16 parameter with a dense gradient."""
    return p.dtype in SUPPORTED and not p.grad.is_sparse


def check_param(name: str, p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(f"{name} does not support sparse gradients")
    if torch.is_complex(p):
        raise RuntimeError(f"{name} does not support complex parameters; use the torch.optim class")
    if p.dtype not in SUPPORTED:
        raise TypeError(f"{name} supports float32, float16 and bfloat16 parameters, got {p.dtype}")


def collect(optimizer, group: dict, state_keys: tuple[str, ...], *, name: str,
            initial_state=None, master_weights: bool = False, with_step: bool = True,
            quantized: Optional["Quantized"] = None) -> dict:
    """Like _collect, but reuses last step's buckets when the same parameters have gradients and
    every gradient still has its parameter's layout: a step then costs a few microseconds of
    Python per parameter instead of re-validating state (it matters on a GPU, where the kernel for
    a ResNet-18 takes about 0.1 ms)."""
    # The state mapping itself is part of the key: clearing or replacing optimizer.state (a reset)
    # rebuilds the buckets, which hold the state tensors and dicts.
    params = group["params"]
    with_grad = itertools.compress(params, map(operator.is_not, map(_grad, params), itertools.repeat(None)))
    key = (tuple(map(id, with_grad)), state_keys, master_weights, with_step, quantized, id(optimizer.state),
           len(optimizer.state))
    plans = optimizer.__dict__.setdefault("_fusedtech_plans", {})
    plan = plans.get(id(group))
    if plan is not None and plan[0] == key:
        buckets, unfused = plan[1], plan[2]
        ok = True
        for (device, dtype, _), b in buckets.items():
            # The state is still what the bucket holds: no parameter's state dict was replaced
            # (optimizer.state[p] = {}) and no state tensor in it (a reset of one parameter).
            # About 0.1 us per parameter and key; map() keeps the loops in C.
            if not (all(map(operator.is_, map(optimizer.state.get, b.originals, itertools.repeat(NO_STATE)),
                            b.state_dicts))
                    and all(all(map(operator.is_, map(operator.methodcaller("get", k), b.state_dicts), refs))
                            for k, refs in b.state_refs.items())):
                ok = False
                break
            grads = [local(p.grad) for p in b.originals] if b.distributed else list(map(_grad, b.originals))
            # Each gradient still laid out as its parameter: map() keeps the per-parameter loop in C.
            if (list(map(_stride, grads)) != b.strides or set(map(_dtype, grads)) != {dtype}
                    or set(map(_device, grads)) != {device} or set(map(_layout, grads)) != {torch.strided}):
                ok = False
                break
            b.grads = grads
        if ok:
            _defer(optimizer, unfused)
            return buckets
    unfused: list = []
    buckets = _collect(optimizer, group, state_keys, name=name, initial_state=initial_state,
                       master_weights=master_weights, with_step=with_step, unfused=unfused, quantized=quantized)
    _defer(optimizer, unfused)
    if all(not b.writeback for b in buckets.values()):
        for b in buckets.values():
            b.strides = [g.stride() for g in b.grads]
        plans[id(group)] = (key, buckets, unfused)
    else:
        plans.pop(id(group), None)
    return buckets


def _defer(optimizer, unfused: list) -> None:
    """Leave these parameters to torch's step (FusedStepMixin._step_unfused), after the kernels."""
    if unfused:
        optimizer.__dict__.setdefault("_fusedtech_unfused", []).extend(unfused)


_grad, _dtype, _device, _layout = (operator.attrgetter(name) for name in ("grad", "dtype", "device", "layout"))
_stride = torch.Tensor.stride


def state_tensors(b: Bucket, key: str) -> list:
    """optimizer.state[p][key] (None where absent) of each parameter of b, local shards for DTensors."""
    found = list(map(operator.methodcaller("get", key), b.state_dicts))
    return [local(t) for t in found] if b.distributed else found


def forget_plans(optimizer) -> None:
    """State was replaced (load_state_dict): rebuild the buckets on the next step."""
    optimizer.__dict__.pop("_fusedtech_plans", None)


@dataclass(frozen=True)
class Quantized:
    """Blockwise quantized states (reference/quantization.py) of format `state_dtype` ("int8" or
    "fp8"): for each (key, signed) in `keys`, state[key] holds uint8 codes laid out like the parameter
    and state[key + "_absmax"] a float32 absmax per block of 256. Parameters with fewer than
    `min_numel` elements keep full-precision states. Their buckets are keyed (device, dtype,
    state_dtype), where others hold the torch state dtype."""
    keys: tuple
    min_numel: int
    state_dtype: str


QUANTIZED_STATE_DTYPES = ("int8", "fp8")
STATE_DTYPES = (None,) + QUANTIZED_STATE_DTYPES
MIN_QUANTIZED_NUMEL = 4096  # bitsandbytes' default: smaller tensors keep full-precision states


def _quantized_state(state: dict, key: str, signed: bool, like: torch.Tensor, state_dtype: str):
    """(codes laid out like `like`, absmax) of state[key], made (zeros), quantized (a full-precision
    state: a torch checkpoint, or a parameter that grew past min_numel) or relaid out (its blocks
    follow memory order, so another layout is dequantized and quantized again) as needed."""
    from ..ops import quantization
    absmax_key = key + "_absmax"
    codes, absmax = state.get(key), state.get(absmax_key)
    if codes is None:
        codes, absmax = quantization.quantize_blockwise(torch.zeros_like(like, dtype=torch.float32), signed=signed,
                                                        state_dtype=state_dtype)
    elif codes.dtype != torch.uint8 or absmax is None:
        codes, absmax = quantization.quantize_blockwise(torch.empty_like(like, dtype=torch.float32).copy_(codes),
                                                        signed=signed, state_dtype=state_dtype)
    elif (codes.device != like.device or codes.stride() != like.stride()
          or absmax.device != like.device or absmax.dtype != torch.float32 or not absmax.is_contiguous()):
        values = quantization.dequantize_blockwise(codes.to(like.device), absmax.to(like.device, torch.float32).contiguous(),
                                                   signed=signed, state_dtype=state_dtype)
        codes, absmax = quantization.quantize_blockwise(torch.empty_like(like, dtype=torch.float32).copy_(values),
                                                        signed=signed, state_dtype=state_dtype)
    else:
        return codes, absmax
    state[key], state[absmax_key] = codes, absmax
    return codes, absmax


def dequantized_state(state: dict, key: str, signed: bool, state_dtype: str) -> None:
    """state[key] back in float32 (a parameter below min_numel, or a quantized optimizer checkpoint
    loaded without quantization)."""
    from ..ops import quantization
    codes, absmax = state.get(key), state.pop(key + "_absmax", None)
    if codes is not None and absmax is not None and codes.dtype == torch.uint8:
        state[key] = quantization.dequantize_blockwise(codes, absmax.float().contiguous(), signed=signed,
                                                       state_dtype=state_dtype)


def _collect(optimizer, group: dict, state_keys: tuple[str, ...], *, name: str,
             initial_state=None, master_weights: bool = False, with_step: bool = True, unfused=None,
             quantized: Optional[Quantized] = None) -> dict:
    """Buckets of the group's parameters that have a gradient, keyed by (device, dtype). Those the
    kernels do not take go to `unfused` when the optimizer can hand them to torch's step, else
    raise.

    state_keys name the per-parameter state tensors, created on first use as zeros shaped and
    laid out like the parameter (initial_state(p, key) may give another start value). With
    master_weights, fp16/bf16 parameters get an fp32 ``master_param`` and fp32 states.
    """
    buckets: dict = defaultdict(Bucket)
    for p in group["params"]:
        if p.grad is None:
            continue
        if unfused is not None and optimizer._torch_fallback and not fusable(p):
            unfused.append(p)
            continue
        check_param(name, p)
        use_master = master_weights and p.dtype in LOW_PRECISION
        # No entry for a parameter that keeps no state (SGD without momentum), as torch.
        state = optimizer.state[p] if state_keys or with_step or use_master else optimizer.state.get(p, NO_STATE)
        state_dtype = torch.float32 if use_master else p.dtype
        quantize = quantized is not None and p.numel() >= quantized.min_numel
        if quantize and is_distributed(p):
            raise NotImplementedError(f"{name}: quantized optimizer states of DTensor (FSDP2) parameters are not "
                                      f"supported yet; use state_dtype=None for them")
        if len(state) == 0:
            if with_step:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            for key in () if quantize else state_keys:  # quantized states are made below, like the work tensor
                init = initial_state(p, key) if initial_state is not None else None
                state[key] = (torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                              if init is None else init.to(state_dtype))
        elif quantized is not None and not quantize:
            for key, signed in quantized.keys:
                dequantized_state(state, key, signed, quantized.state_dtype)
        if use_master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)

        shard = local(p)
        work, grad = shard, local(p.grad)
        if (not dense(shard) or not same_layout(grad, shard)
                or (use_master and local(state["master_param"]).stride() != shard.stride())):
            work = shard.detach().contiguous()
            grad = grad.contiguous()
        elif not dense(grad):
            grad = grad.contiguous()
        b = buckets[(p.device, p.dtype, quantized.state_dtype if quantize else state_dtype)]
        if work is not shard:
            b.writeback.append((shard, work))
        b.params.append(work)
        b.originals.append(p)
        b.distributed = b.distributed or is_distributed(p)
        b.state_dicts.append(state)
        b.grads.append(grad)
        if quantize:
            for key, signed in quantized.keys:
                codes, absmax = _quantized_state(state, key, signed, work, quantized.state_dtype)
                b.states[key].append(codes)
                b.states[key + "_absmax"].append(absmax)
        else:
            for key in state_keys:
                b.states[key].append(matching_state(state, key, work, state_dtype))
        if use_master:
            b.masters.append(matching_state(state, "master_param", work, torch.float32))
        if with_step:
            step = state["step"]
            if not torch.is_tensor(step):  # torch_optimizer keeps an int
                step = state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
            if step.device != p.device or step.dtype != torch.float32:
                # torch keeps non-fused steps on the CPU; our kernels read them on the device.
                step = state["step"] = step.to(device=p.device, dtype=torch.float32)
            b.steps.append(step)
    keys = state_keys + ("step",) * with_step + ("master_param",) * master_weights
    if quantized is not None:
        keys += tuple(k + "_absmax" for k, _ in quantized.keys)
    for b in buckets.values():
        b.state_refs = {k: [sd.get(k) for sd in b.state_dicts] for k in keys}
    return buckets


def matching_state(state: dict, key: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """state[key], relaid out once (to like's strides, device and `dtype`) if a checkpoint gave it another."""
    s = state[key]
    if is_distributed(s):
        s = s.to_local()
        if s.stride() != like.stride() or s.dtype != dtype or s.device != like.device:
            raise RuntimeError(f"fusedtech: optimizer state {key!r} is a DTensor whose local shard is laid out "
                               f"unlike its parameter's ({s.stride()}, {s.dtype} vs {like.stride()}, {dtype})")
        return s
    if s.stride() != like.stride() or s.dtype != dtype or s.device != like.device:
        s = state[key] = torch.empty_like(like, dtype=dtype).copy_(s)
    return s


def scaler_tensors(optimizer, device: torch.device):
    """GradScaler's grad_scale and found_inf (set on the optimizer around step()) on `device`."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if grad_scale is not None:
        grad_scale = grad_scale.to(device=device, dtype=torch.float32, non_blocking=True)
    if found_inf is not None:
        found_inf = found_inf.to(device=device, dtype=torch.float32, non_blocking=True)
    return grad_scale, found_inf


def undo_skipped_steps(steps: list, found_inf) -> None:
    """After the kernel: a step GradScaler skipped (found_inf = 1) must not count."""
    if found_inf is not None and steps:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def finish(bucket: Bucket, optimizer) -> None:
    """After a bucket's kernel: copies written back to their parameters; and under GradScaler, the
    gradients left unscaled, as torch's optimizers leave them (its fused kernels unscale them in
    place; otherwise GradScaler unscales before the step): the kernel read them scaled."""
    for p, work in bucket.writeback:
        p.detach().copy_(work)
    grad_scale = optimizer.__dict__.get("grad_scale")
    if grad_scale is not None:
        grads = [local(p.grad) for p in bucket.originals]
        inverse = grad_scale.double().reciprocal().float()  # GradScaler's own inverse
        torch._foreach_mul_(grads, inverse.to(grads[0].device))


def lr_args(lr, device):
    """(float lr, lr tensor on device or None): a Tensor lr stays on the device, no sync."""
    if isinstance(lr, torch.Tensor):
        return 0.0, lr.detach().to(device=device, dtype=torch.float32)
    return float(lr), None


def restore_fp32_state(optimizer, state_dict: dict, keys: tuple[str, ...]) -> None:
    """torch's load_state_dict casts every state tensor to its parameter's dtype; with master
    weights the states are fp32, so take them again from the state_dict being loaded."""
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for pid, p in zip(saved_ids, params):
        saved = state_dict["state"].get(pid)
        if not saved or not groups[id(p)].get("master_weights") or p.dtype not in LOW_PRECISION:
            continue
        state = optimizer.state[p]
        for key in keys + ("master_param",):
            if key in saved and torch.is_tensor(saved[key]):
                state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)
        if "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)


def restore_quantized_state(optimizer, state_dict: dict) -> None:
    """torch's load_state_dict casts every state tensor to its parameter's dtype: quantized codes
    (uint8) and their float32 absmax are taken again, as saved, from the state_dict being loaded, and
    a bitsandbytes 8-bit optimizer's state is translated (quantized.from_bitsandbytes). A group that
    keeps full-precision states, or another format (int8 codes loaded into an fp8 optimizer), gets
    them dequantized (its step quantizes them in its own format)."""
    from .quantized import SIGNED_STATES, from_bitsandbytes
    from ..ops import quantization
    saved_ids = [(i, g.get("state_dtype") or "int8") for g in state_dict["param_groups"] for i in g["params"]]
    groups = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    for (pid, saved_format), (p, group) in zip(saved_ids, groups):
        saved = state_dict["state"].get(pid) or {}
        translated = from_bitsandbytes(saved, p, optimizer._bitsandbytes_states)
        if translated is not None:
            saved_format = "int8"
            state = optimizer.state[p]
            state.clear()
            state.update(translated)
            saved = translated
        for key, absmax in saved.items():
            codes = saved.get(key[:-len("_absmax")])
            if key.endswith("_absmax") and torch.is_tensor(absmax) and torch.is_tensor(codes) and codes.dtype == torch.uint8:
                state = optimizer.state[p]
                name = key[:-len("_absmax")]
                absmax = absmax.to(device=p.device, dtype=torch.float32, copy=True)
                codes = codes.to(device=p.device, copy=True)
                if group.get("state_dtype") != saved_format:  # torch's states, or another format
                    del state[key]
                    state[name] = quantization.dequantize_blockwise(codes, absmax, signed=name in SIGNED_STATES,
                                                                    state_dtype=saved_format)
                else:
                    state[key], state[name] = absmax, codes


def _duplicate_passes(optimizer, group: dict) -> list:
    """The passes of a group that lists a parameter more than once (see FusedStepMixin._groups):
    dicts with the group's hyperparameters, kept on the optimizer so that collect() reuses their
    buckets from step to step; refreshed each step (a scheduler changes lr)."""
    params = group["params"]
    key = tuple(map(id, params))
    cache = optimizer.__dict__.setdefault("_fusedtech_passes", {})
    entry = cache.get(id(group))
    if entry is None or entry[0] != key:
        seen: dict = {}
        lists: list = []
        for p in params:
            k = seen.get(id(p), 0)
            seen[id(p)] = k + 1
            if k == len(lists):
                lists.append([])
            lists[k].append(p)
        entry = cache[id(group)] = (key, [{"params": ps} for ps in lists])
    for d in entry[1]:
        d.update((k, v) for k, v in group.items() if k != "params")
    return entry[1]


class FusedStepMixin:
    """Shared by every fused optimizer; mixed in before the torch class it replaces.

    Subclasses set ``_fused_state`` (the state tensors kept in fp32 with master weights) and
    implement step(). Construction goes through the torch class, so arguments, defaults,
    validation messages, param_groups and repr are torch's own.
    """

    _fused_state: tuple[str, ...] = ()
    # Parameters the kernels do not take (float64, complex, sparse gradients) are stepped by the
    # torch class this one subclasses; False where there is none (LAMB): they are refused.
    _torch_fallback = True

    def _fused_setup(self, name: str, master_weights: bool, differentiable: bool, state_dtype=None,
                     min_quantized_numel: int = MIN_QUANTIZED_NUMEL, bf16_stochastic_round: bool = False) -> None:
        if differentiable:
            raise ValueError(f"fusedtech.optim.{name} does not support differentiable=True; "
                             f"use torch.optim.{name} for higher-order optimization")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"fusedtech.optim.{name}: state_dtype must be None (the parameters' dtype, as torch), "
                             f"'int8' (blockwise 8-bit states) or 'fp8' (blockwise E4M3 states), got {state_dtype!r}")
        if int(min_quantized_numel) < 0:
            raise ValueError(f"fusedtech.optim.{name}: min_quantized_numel must be >= 0, got {min_quantized_numel}")
        if bf16_stochastic_round and master_weights:
            raise ValueError(f"fusedtech.optim.{name}: bf16_stochastic_round and master_weights are alternatives "
                             f"(stochastic rounding keeps bf16 parameters without fp32 master copies)")
        self._fusedtech_name = name
        # Extra options enter param_groups only when set, so param_groups and repr stay exactly torch's
        # otherwise.
        extra = {"master_weights": True} if master_weights else {}
        if state_dtype is not None:
            extra.update(state_dtype=state_dtype, min_quantized_numel=int(min_quantized_numel))
        if bf16_stochastic_round:
            # Drawn from torch's default generator (torch.manual_seed reproduces a run) and kept in the
            # state_dict, so a resumed run draws what the uninterrupted one would.
            extra.update(bf16_stochastic_round=True,
                         stochastic_round_seed=int(torch.randint(0, 2 ** 62, (), dtype=torch.int64)))
        for group in self.param_groups:
            group.update(extra)
        self.defaults.update(extra)
        # GradScaler then hands us grad_scale/found_inf instead of unscaling .grad itself.
        self._step_supports_amp_scaling = True

    def _groups(self):
        """The param groups a step runs over, in order. A group that lists a parameter more than
        once (torch warns, and its step updates the parameter once per listing, one after another)
        runs as several passes: pass k holds the k-th listing of each parameter, so no kernel call
        holds one tensor twice (two chunks of one launch would race on it). GradScaler's scale is
        applied by the first pass only: its finish() leaves the gradients unscaled."""
        for group in self.param_groups:
            params = group["params"]
            if len(set(map(id, params))) == len(params):
                yield group
                continue
            passes = _duplicate_passes(self, group)
            yield passes[0]
            scale = self.__dict__.pop("grad_scale", None)
            try:
                yield from passes[1:]
            finally:
                if scale is not None:
                    self.grad_scale = scale

    def _step_unfused(self) -> None:
        """After the kernels: torch's own step for the parameters collect() left to it (rare, so
        simple: every other gradient is hidden from torch's step for the call)."""
        unfused = self.__dict__.pop("_fusedtech_unfused", None)
        if not unfused:
            return
        unfused = list({id(p): p for p in unfused}.values())  # a parameter listed twice: torch steps it twice
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is not None:  # GradScaler left the gradients scaled for the kernels to unscale
            inverse = grad_scale.double().reciprocal()
            for p in unfused:
                p.grad.mul_(inverse.to(p.grad.device, p.grad.dtype if not p.grad.is_complex() else torch.float64))
        if found_inf is not None and found_inf.item():
            return  # GradScaler skips this step (the one host sync, for these parameters only)
        keep = {id(p) for p in unfused}
        hidden = [(p, p.grad) for g in self.param_groups for p in g["params"]
                  if p.grad is not None and id(p) not in keep]
        scaler = {k: self.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in self.__dict__}
        try:
            for p, _ in hidden:
                p.grad = None
            step = next(c.__dict__["step"] for c in type(self).__mro__[type(self).__mro__.index(FusedStepMixin) + 1:]
                        if "step" in c.__dict__)
            # Not through torch's hook wrapper, if a torch instance put one on its class: our
            # step already ran the hooks.
            (step.__wrapped__ if getattr(step, "hooked", False) else step)(self)
        finally:
            for p, grad in hidden:
                p.grad = grad
            self.__dict__.update(scaler)

    # A bitsandbytes optimizer's state1 / state2 are these state keys here (empty: no translation).
    _bitsandbytes_states: tuple[str, ...] = ()

    # Options an optimizer keeps as attributes (LAMB, as torch_optimizer): pickled with it.
    _fusedtech_attributes: tuple[str, ...] = ()

    def __getstate__(self):
        # torch's Optimizer pickles only defaults, state and param_groups: a deepcopy, pickle or
        # torch.save of the optimizer would lose what the fused step reads.
        state = super().__getstate__()
        state["_fusedtech"] = {k: self.__dict__[k] for k in ("_fusedtech_name",) + self._fusedtech_attributes
                               if k in self.__dict__}
        return state

    def __setstate__(self, state):
        extra = state.pop("_fusedtech", {})
        super().__setstate__(state)
        self.__dict__.update(extra)
        self.__dict__.setdefault("_fusedtech_name", type(self).__name__)
        self._step_supports_amp_scaling = True

    # Options of ours that live in param_groups (only when set); a checkpoint that does not name them
    # (torch's own) keeps the constructor's, where torch's load would drop them with the old groups.
    _GROUP_OPTIONS = ("master_weights", "state_dtype", "min_quantized_numel", "bf16_stochastic_round",
                      "stochastic_round_seed")

    # The state format is this optimizer's own (as its class is): a checkpoint of another format is
    # converted on loading, not adopted.
    _FORMAT_OPTIONS = ("state_dtype", "min_quantized_numel")

    def load_state_dict(self, state_dict):
        kept = [{k: g[k] for k in self._GROUP_OPTIONS if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, options in zip(self.param_groups, kept):
            for key in self._FORMAT_OPTIONS:
                group.pop(key, None)
            for key, value in options.items():
                group[key] = value if key in self._FORMAT_OPTIONS else group.get(key, value)
        forget_plans(self)
        restore_fp32_state(self, state_dict, self._fused_state)
        restore_quantized_state(self, state_dict)

    def _buckets(self, group, keys, **kw):
        return collect(self, group, keys, name=f"fusedtech.optim.{self._fusedtech_name}",
                       master_weights=group.get("master_weights", False), **kw)

    def _stochastic_round_seed(self, group: dict, index: int, dtype: torch.dtype, bucket: Bucket) -> Optional[int]:
        """The seed of a bucket's stochastic rounding (None: to nearest): bf16 parameters without masters in
        a group with bf16_stochastic_round. Groups draw distinct streams even where they share a seed."""
        if not group.get("bf16_stochastic_round") or dtype != torch.bfloat16 or bucket.masters:
            return None
        return (int(group["stochastic_round_seed"]) + index * 0x9E3779B97F4A7C15) % (1 << 63)

    def _quantized(self, group, keys) -> Optional[Quantized]:
        """The group's quantized states (None: full precision): `keys` are (state key, signed) pairs."""
        if group.get("state_dtype") is None:
            return None
        return Quantized(keys, int(group.get("min_quantized_numel", MIN_QUANTIZED_NUMEL)), group["state_dtype"])
