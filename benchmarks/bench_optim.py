"""Optimizer step: one full step over a real model's parameter list, each implementation.

Bytes moved per step, fp32, counting each input read once and each output written once:
Adam/AdamW/LAMB 28 per parameter (read param, grad, exp_avg, exp_avg_sq; write three of them),
SGD with momentum, RMSprop and Adagrad 20 (read param, grad, one state; write param, state).
LAMB needs the per-tensor norms before it can update, so it makes a second pass (40 bytes moved);
its GB/s is still reported on the 28 it must move. Adam/AdamW with 8-bit or FP8 states (fusedtech's
``state_dtype="int8"`` / ``"fp8"``, bitsandbytes' AdamW8bit, torchao's AdamW8bit / AdamWFp8) move 16 per parameter (param and grad
4 each, two 1-byte codes read; param and two codes written; the absmax adds 8 bytes per 256
elements, left out) and keep 2.03 bytes of state per parameter against fp32's 8. GB/s = bytes / time;
the copy case moves the same bytes (half read, half written) with one device copy.
"""
from __future__ import annotations

import pytest
import torch

import fusedtech
from benchmarks import _common
from benchmarks.param_shapes import cases, make_params

DEV = _common.device()
CASES = cases(DEV)
QUICK = _common.QUICK

# name: (constructor kwargs, bytes per parameter, torch has a fused implementation on this device)
OPTIMIZERS = {
    "Adam": (dict(lr=1e-3), 28, True),
    "AdamW": (dict(lr=1e-3), 28, True),
    "SGD": (dict(lr=1e-2, momentum=0.9), 20, True),
    "RMSprop": (dict(lr=1e-3), 20, False),
    "Adagrad": (dict(lr=1e-2), 20, DEV.type == "cpu"),
    "LAMB": (dict(lr=1e-3, weight_decay=0.01), 28, False),
}


def _deepspeed_cpu_adam():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam
    except Exception:  # noqa: BLE001 - any import/JIT-build failure means "not available here"
        return None


def _bitsandbytes_8bit(opt_name: str):
    try:
        import bitsandbytes
        return getattr(bitsandbytes.optim, f"{opt_name}8bit")
    except Exception:  # noqa: BLE001 - absent, or unable to load its native library here
        return None


def _torchao_low_bit(opt_name: str) -> dict:
    """torchao's low-bit AdamW classes by state format ({} if absent)."""
    try:
        from torchao.optim import AdamW8bit, AdamWFp8
        return {"8bit": AdamW8bit, "Fp8": AdamWFp8} if opt_name == "AdamW" else {}
    except Exception:  # noqa: BLE001
        return {}


EIGHT_BIT_BYTES = 16  # per parameter: see the module docstring


def bytes_per_param(opt_name: str, impl: str) -> int:
    return EIGHT_BIT_BYTES if impl.endswith(("8bit", "fp8", "Fp8")) else OPTIMIZERS[opt_name][1]


def _torch_optimizer_lamb():
    try:
        import torch_optimizer
        return torch_optimizer.Lamb
    except ImportError:
        return None


def implementations(opt_name: str):
    """(impl name, factory(params) -> optimizer, backend or None) that can run on this device."""
    kwargs, _, has_fused = OPTIMIZERS[opt_name]
    fused_cls = getattr(fusedtech.optim, opt_name)
    impls = []
    if opt_name == "LAMB":
        lamb = _torch_optimizer_lamb()
        if lamb is not None:
            impls.append(("torch_optimizer-Lamb", lambda ps: lamb(ps, **kwargs), None))
    else:
        torch_cls = getattr(torch.optim, opt_name)
        impls += [("torch-forloop", lambda ps: torch_cls(ps, foreach=False, **kwargs), None),
                  ("torch-foreach", lambda ps: torch_cls(ps, foreach=True, **kwargs), None)]
        if has_fused:
            impls.append(("torch-fused", lambda ps: torch_cls(ps, fused=True, **kwargs), None))
    for backend in fusedtech.available_backends(DEV):
        if backend == "torch" or (backend == "triton" and DEV.type == "cpu"):
            continue  # the reference and the interpreter are for testing, not timing
        impls.append((f"fusedtech-{backend}", lambda ps: fused_cls(ps, **kwargs), backend))
        if opt_name in ("Adam", "AdamW"):
            impls.append((f"fusedtech-{backend}-8bit", lambda ps: fused_cls(ps, state_dtype="int8", **kwargs), backend))
            impls.append((f"fusedtech-{backend}-fp8", lambda ps: fused_cls(ps, state_dtype="fp8", **kwargs), backend))
    bnb = _bitsandbytes_8bit(opt_name) if opt_name in ("Adam", "AdamW") else None
    if bnb is not None:
        impls.append((f"bitsandbytes-{opt_name}8bit", lambda ps: bnb(ps, **kwargs), None))
    # torchao compiles one step per parameter shape (minutes on a CPU): full runs only.
    for suffix, ao in (_torchao_low_bit(opt_name) if not QUICK else {}).items():
        impls.append((f"torchao-{opt_name}{suffix}", lambda ps, ao=ao: ao(ps, **kwargs), None))
    ds = _deepspeed_cpu_adam() if opt_name in ("Adam", "AdamW") and DEV.type == "cpu" else None
    if ds is not None:
        impls.append(("deepspeed-cpu-adam",
                      lambda ps: ds(ps, lr=1e-3, adamw_mode=(opt_name == "AdamW"), fp32_optimizer_states=True), None))
    return impls


def _selected_cases(opt_name):
    # The CPU quick run times Adam/AdamW on both lists and the others on ResNet-18 only.
    if QUICK and DEV.type == "cpu" and opt_name not in ("Adam", "AdamW"):
        return ["resnet18"]
    return list(CASES)


PARAMS = [(opt, case, name) for opt in OPTIMIZERS for case in _selected_cases(opt) for name, _, _ in implementations(opt)]


@pytest.mark.parametrize("opt_name,case,impl", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_optimizer_step(benchmark, opt_name, case, impl):
    _, factory, backend = next(i for i in implementations(opt_name) if i[0] == impl)
    params = make_params(CASES[case], DEV)
    numel = sum(p.numel() for p in params)
    opt = factory(params)

    def step():
        with fusedtech.use_backend(backend):
            opt.step()

    step()  # state made (8-bit: quantized) outside the timing, as every later step finds it
    state_bytes = sum(_storage_bytes(t) for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    _common.measure(benchmark, step, dev=DEV, op=f"{opt_name}.step", impl=impl, case=case, dtype=torch.float32,
                    bytes_moved=bytes_per_param(opt_name, impl) * numel, params=numel, tensors=len(params),
                    calls=None if DEV.type == "cuda" else 1, state_bytes_per_param=round(state_bytes / numel, 3))


def _storage_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor keeps; torchao's low-bit states are tensor subclasses holding codes and scales."""
    parts = [getattr(t, name) for name in ("codes", "scale") if torch.is_tensor(getattr(t, name, None))]
    return sum(p.numel() * p.element_size() for p in parts) if parts else t.numel() * t.element_size()


COPY_BYTES = sorted({b for _, b, _ in OPTIMIZERS.values()} | {EIGHT_BIT_BYTES})


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bytes_per_param", COPY_BYTES)
def test_copy(benchmark, case, bytes_per_param):
    numel = sum(torch.Size(s).numel() for s in CASES[case])
    nbytes = bytes_per_param * numel
    _common.measure(benchmark, _common.copy_fn(nbytes, DEV), dev=DEV, op="copy", impl="copy",
                    case=f"{case}", dtype=torch.float32, bytes_moved=nbytes, params=numel,
                    bytes_per_param=bytes_per_param)
