"""Build fusedtech: the CPU extension always, the CUDA extension when nvcc and a CUDA torch exist.

Either extension may fail to build; the package then still installs and runs on the backends that
remain, and `python -m fusedtech` says why (the reasons are kept in fusedtech/_build_info.json).

Environment:
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0")
  FUSEDTECH_BUILD_CUDA     0 to skip the CUDA extension
  FUSEDTECH_CPU_ARCH       -march value for the CPU kernels (default "native"; they are built
                           from source on the machine that runs them)
  CUDA_HOME                the toolkit folder (holds include/cuda_runtime.h); found from nvcc if unset
"""
import glob
import json
import os
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """The toolkit folder, also when `nvcc` on the PATH is a wrapper script naming the real one."""
    def ok(d):
        return d and os.path.isfile(os.path.join(d, "include", "cuda_runtime.h"))

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if ok(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cand = os.path.dirname(os.path.dirname(real))
        if ok(cand):
            return cand
        try:
            with open(real, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for m in re.finditer(r"(/[\w./+-]+)/bin/nvcc", head):
                if ok(m.group(1)):
                    return m.group(1)
        except OSError:
            pass
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if ok(cand):
            return cand
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

BUILD_INFO = {"cpu": "not attempted", "cuda": "not attempted"}


def _compiler_info() -> str:
    """The C++ compiler torch's build uses ($CXX, else c++) and its version: an extension built by
    another toolchain than torch's can misbehave (see benchmarks/gpu_run.sh), so it is recorded."""
    cxx = os.environ.get("CXX", "c++")
    try:
        import subprocess
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except Exception as e:  # noqa: BLE001 - informative only
        version = f"unknown ({type(e).__name__})"
    return f"{cxx}: {version}"


BUILD_INFO["compiler"] = _compiler_info()
INCLUDE = [os.path.join(ROOT, "csrc", "include")]


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cpu_extension():
    arch = os.environ.get("FUSEDTECH_CPU_ARCH", "native")
    # -fno-math-errno: sqrt must not set errno, or GCC calls libm per element instead of vectorising.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
    if arch and sys.platform.startswith("linux"):
        flags.append(f"-march={arch}")
    return CppExtension(
        "fusedtech._C",
        _rel([os.path.join(ROOT, "csrc", "ops.cpp")] + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
        include_dirs=INCLUDE,
        extra_compile_args={"cxx": flags},
        extra_link_args=["-fopenmp"],
    )


def _cuda_extension():
    if os.environ.get("FUSEDTECH_BUILD_CUDA", "1") == "0":
        BUILD_INFO["cuda"] = "skipped: FUSEDTECH_BUILD_CUDA=0"
        return None
    if torch.version.cuda is None:
        BUILD_INFO["cuda"] = f"skipped: torch {torch.__version__} is not a CUDA build"
        return None
    if _cuda_home is None:
        BUILD_INFO["cuda"] = "skipped: no CUDA toolkit found (set CUDA_HOME to the folder with include/cuda_runtime.h)"
        return None
    include = list(INCLUDE)
    # The CUDA builds of torch include cuBLAS/cuSPARSE headers shipped in the pip 'nvidia' packages.
    for site in sys.path:
        include += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        include += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return CUDAExtension(
        "fusedtech._C_cuda",
        _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))),
        include_dirs=include,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )


class OptionalBuildExtension(BuildExtension):
    """Builds what it can: a failed extension is recorded, not fatal."""

    _failed: set = set()

    def build_extension(self, ext):
        key = "cuda" if ext.name.endswith("_C_cuda") else "cpu"
        try:
            super().build_extension(ext)
            BUILD_INFO[key] = "built"
        except Exception as e:  # noqa: BLE001 - any compiler failure must leave the package usable
            BUILD_INFO[key] = f"build failed: {type(e).__name__}: {str(e)[-2000:]}"
            self._failed.add(ext.name)
            print(f"fusedtech: the {key} extension did not build; continuing without it.\n{e}", file=sys.stderr)

    def build_extensions(self):
        super().build_extensions()
        # What failed has no file to copy into the wheel or the source tree.
        self.extensions = [e for e in self.extensions if e.name not in self._failed]

    def run(self):
        super().run()
        out_dir = os.path.dirname(self.get_ext_fullpath("fusedtech._C"))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(BUILD_INFO, f, indent=1)


extensions = [_cpu_extension()]
_cuda = _cuda_extension()
if _cuda is not None:
    extensions.append(_cuda)

setup(
    name="fusedtech",
    version="0.1.0",
    description="Fused optimizer, normalization and dropout kernels for PyTorch (CUDA, Triton, CPU)",
    packages=["fusedtech", "fusedtech.ops", "fusedtech.reference", "fusedtech.optim", "fusedtech.nn",
              "fusedtech.triton_kernels"],
    package_dir={"fusedtech.triton_kernels": "triton_kernels"},
    ext_modules=extensions,
    cmdclass={"build_ext": OptionalBuildExtension.with_options(no_python_abi_suffix=False)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "triton>=3.6,<3.10; platform_system=='Linux'", "tqdm"],
    extras_require={
        # torch-optimizer: torch_optimizer.Lamb, the reference our LAMB is a drop-in for; matplotlib: the
        # tests draw the CIFAR example's and the suite's plots; hypothesis: the property-based fuzz suite.
        # timm, transformers (+ accelerate, for its Trainer): convert_model's tests on their models.
        # expecttest: torch.testing._internal imports it, and the norm tests run PyTorch's own
        # ModuleInfo inputs (common_modules.module_db) against the drop-ins. bitsandbytes, torchao: the
        # 8-bit optimizer tests compare their maps and quantizers (and bitsandbytes' CPU AdamW8bit's
        # training) with ours.
        "test": ["pytest>=7", "pytest-benchmark>=4", "numpy", "torch-optimizer", "matplotlib", "tqdm",
                 "hypothesis>=6", "timm", "transformers", "accelerate", "expecttest", "bitsandbytes", "torchao"],
        # deepspeed: DeepSpeedCPUAdam, the CPU bar the optimizer benchmark reports beside torch;
        # timm, transformers: the models of the end-to-end training-step benchmark; bitsandbytes, torchao:
        # the 8-bit AdamW peers.
        "bench": ["pytest-benchmark>=4", "matplotlib", "tqdm", "deepspeed", "timm", "transformers", "bitsandbytes",
                  "torchao"],
    },
)
