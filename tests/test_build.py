"""Ahead-of-time GPU compilation of the optimizer kernels, and the nvcc build of the CUDA extension."""
import json
import os
import shutil

import pytest
import torch

import fusedtech
from aot import compile_for_gpus

ADAM_SIGNATURE = {"ptrs": "*i64", "chunks": "*i64", "hyper": "*fp64", "lr": "fp32", "lr_ptr": "*fp32",
                  "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "beta1": "fp32", "beta2": "fp32",
                  "one_minus_beta1": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "weight_decay": "fp32",
                  "seed": "i64"}
ADAM_QUANTIZED_SIGNATURE = dict(list(ADAM_SIGNATURE.items())[:3] + [("tables", "*fp32")] + list(ADAM_SIGNATURE.items())[3:])


ADAM_FLAGS = [dict(AMSGRAD=True, HAS_WEIGHT_DECAY=True, DECOUPLED=True, MAXIMIZE=True, HAS_LR_PTR=True,
                   HAS_GRAD_SCALE=True, HAS_FOUND_INF=True),
              dict(AMSGRAD=False, HAS_WEIGHT_DECAY=False, DECOUPLED=False, MAXIMIZE=False, HAS_LR_PTR=False,
                   HAS_GRAD_SCALE=False, HAS_FOUND_INF=False)]


@pytest.mark.parametrize("param,state,master,stochastic", [
    ("float32", "float32", False, False), ("bfloat16", "bfloat16", False, False), ("float16", "float32", True, False),
    ("bfloat16", "bfloat16", False, True)], ids=["fp32", "bf16", "fp16-master", "bf16-stochastic-round"])
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=["all-options", "plain"])
def test_adam_triton_kernel_compiles_for_sm80_sm90(param, state, master, stochastic, flags):
    import triton.language as tl
    from fusedtech.triton_kernels.adam import _adam_kernel
    consts = dict(PARAM=getattr(tl, param), STATE=getattr(tl, state), HAS_MASTER=master, STOCHASTIC_ROUND=stochastic,
                  BLOCK=1024, **flags)
    for compiled in compile_for_gpus(_adam_kernel, ADAM_SIGNATURE, consts):
        ptx = compiled.asm["ptx"]
        # IEEE sqrt and division, as the parity with torch assumes (not the approximate forms).
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
        assert "sqrt.approx.f32" not in ptx


@pytest.mark.parametrize("param,master,stochastic", [("float32", False, False), ("bfloat16", False, True),
                                                     ("float16", True, False)],
                         ids=["fp32", "bf16-stochastic-round", "fp16-master"])
@pytest.mark.parametrize("flags", ADAM_FLAGS, ids=["all-options", "plain"])
def test_8bit_adam_triton_kernel_compiles_for_sm80_sm90(param, master, stochastic, flags):
    import triton.language as tl
    from fusedtech.triton_kernels.adam import _adam_quantized_kernel
    from fusedtech.triton_kernels.quantization import QBLOCK, ROWS
    consts = dict(PARAM=getattr(tl, param), HAS_MASTER=master, STOCHASTIC_ROUND=stochastic, ROWS=ROWS, QBLOCK=QBLOCK,
                  **flags)
    for compiled in compile_for_gpus(_adam_quantized_kernel, ADAM_QUANTIZED_SIGNATURE, consts):
        ptx = compiled.asm["ptx"]
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx


def _nvcc_usable():
    return shutil.which("nvcc") is not None and torch.version.cuda is not None


def test_cuda_extension_built_with_nvcc():
    """Where nvcc and a CUDA build of torch exist (as here and in CI), setup.py must have compiled
    csrc/cuda/*.cu for sm_80/sm_90; a failure is recorded in _build_info.json with the compiler's
    message, which this test prints."""
    if not _nvcc_usable():
        pytest.skip("no nvcc or not a CUDA build of torch")
    if os.environ.get("FUSEDTECH_BUILD_CUDA") == "0":
        pytest.skip("FUSEDTECH_BUILD_CUDA=0")
    path = os.path.join(os.path.dirname(fusedtech.__file__), "_build_info.json")
    with open(path) as f:
        info = json.load(f)
    assert info["cuda"] == "built", info["cuda"]
    assert info["cpu"] == "built", info["cpu"]
    so = [n for n in os.listdir(os.path.dirname(fusedtech.__file__)) if n.startswith("_C_cuda") and n.endswith(".so")]
    assert so, "the CUDA extension library is missing"


_COMMON = {"ptrs": "*i64", "chunks": "*i64", "lr": "fp32", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32",
           "found_inf_ptr": "*fp32"}
_FLAGS_ON = dict(HAS_WEIGHT_DECAY=True, MAXIMIZE=True, HAS_LR_PTR=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True)
OPTIMIZER_KERNELS = [
    ("sgd", "_sgd_kernel", dict(_COMMON, momentum="fp32", one_minus_dampening="fp32", weight_decay="fp32"),
     [dict(MOMENTUM=True, FIRST_STEP=False, NESTEROV=True), dict(MOMENTUM=True, FIRST_STEP=True, NESTEROV=False)]),
    ("rmsprop", "_rmsprop_kernel", dict(_COMMON, alpha="fp32", one_minus_alpha="fp32", eps="fp32",
                                        weight_decay="fp32", momentum="fp32"),
     [dict(CENTERED=True, MOMENTUM=True), dict(CENTERED=False, MOMENTUM=False)]),
    ("adagrad", "_adagrad_kernel", dict(_COMMON, lr_decay="fp32", eps="fp32", weight_decay="fp32"), [dict()]),
]


@pytest.mark.parametrize("module,kernel,signature,variants", OPTIMIZER_KERNELS, ids=[k[0] for k in OPTIMIZER_KERNELS])
def test_optimizer_triton_kernels_compile_for_sm80_sm90(module, kernel, signature, variants):
    import importlib

    import triton.language as tl
    fn = getattr(importlib.import_module(f"fusedtech.triton_kernels.{module}"), kernel)
    for variant, (param, state, master) in zip(variants * 2, [("float32", "float32", False), ("bfloat16", "float32", True)]):
        consts = dict(PARAM=getattr(tl, param), STATE=getattr(tl, state), HAS_MASTER=master, BLOCK=1024,
                      **_FLAGS_ON, **variant)
        for compiled in compile_for_gpus(fn, signature, consts):
            assert "sqrt.approx.f32" not in compiled.asm["ptx"]


@pytest.mark.parametrize("dtype,inf", [("float32", False), ("bfloat16", True)])
def test_grad_norm_triton_kernel_compiles(dtype, inf):
    import triton.language as tl
    from fusedtech.triton_kernels.grad_norm import _norm_partials_kernel
    consts = dict(DTYPE=getattr(tl, dtype), INF=inf, BLOCK=1024)
    for compiled in compile_for_gpus(_norm_partials_kernel, {"ptrs": "*i64", "chunks": "*i64", "partials": "*fp32"},
                                     consts):
        assert compiled.asm["cubin"]


def test_lamb_triton_kernels_compile():
    import triton.language as tl
    from fusedtech.triton_kernels import lamb
    kinds = dict(PARAM=tl.bfloat16, STATE=tl.float32, HAS_MASTER=True, HAS_WEIGHT_DECAY=True, HAS_FOUND_INF=True,
                 BIAS_CORRECTION=True, BLOCK=1024)
    compile_for_gpus(lamb._lamb_moments_kernel,
                     {"ptrs": "*i64", "chunks": "*i64", "partials": "*fp32", "grad_scale_ptr": "*fp32",
                      "found_inf_ptr": "*fp32", "log_betas": "*fp64", "beta1": "fp32", "beta2": "fp32",
                      "grad_coef": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "weight_decay": "fp32"},
                     dict(kinds, HAS_GRAD_SCALE=True))
    compile_for_gpus(lamb._lamb_ratio_kernel,
                     {"ptrs": "*i64", "ranges": "*i64", "partials": "*fp32", "neg_steps": "*fp32", "norms": "*fp32",
                      "found_inf_ptr": "*fp32", "lr": "fp32", "lr_ptr": "*fp32", "log_betas": "*fp64",
                      "clamp_lower": "fp32", "clamp_upper": "fp32"},
                     dict(HAS_LR_PTR=True, DEBIAS=True, ADAM=False, TRUST_CLIP=True, HAS_FOUND_INF=True, BLOCK=256))
    compile_for_gpus(lamb._lamb_update_kernel,
                     {"ptrs": "*i64", "chunks": "*i64", "neg_steps": "*fp32", "found_inf_ptr": "*fp32",
                      "log_betas": "*fp64", "eps": "fp32", "weight_decay": "fp32"}, kinds)


def _schema_ops():
    """The op names csrc/ops.cpp defines (m.def("name(...")."""
    import re
    with open(os.path.join(os.path.dirname(__file__), "..", "csrc", "ops.cpp")) as f:
        source = f.read()
    return re.findall(r'm\.def\(\s*"(\w+)\(', source)


def test_every_compiled_op_has_a_cpu_and_a_cuda_kernel():
    # One schema, one registration per device (extension-cpp's rule): every op runs on CPU tensors,
    # and where the CUDA extension is built, on CUDA tensors too.
    from fusedtech import _backend
    ops = _schema_ops()
    assert len(ops) >= 15 and "dropout_add_norm_fwd" in ops and "drop_block_keep" in ops
    if _backend._load_extension("_C")[0] is None:
        pytest.skip("the C++ extension is not built")
    missing_cpu = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtech_C::{op}", "CPU")]
    assert not missing_cpu
    if _backend.cuda_extension() is None:
        pytest.skip("the CUDA extension is not built or cannot load here")
    missing_cuda = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedtech_C::{op}", "CUDA")]
    assert not missing_cuda
