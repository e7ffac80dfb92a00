"""Backend discovery, selection and override."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fusedtech
from fusedtech import _backend


def test_torch_backend_always_available():
    assert "torch" in fusedtech.available_backends("cpu")
    assert fusedtech.why_unavailable("torch", "cpu") is None


def test_cpu_extension_built():
    # setup.py always builds the CPU extension; if it failed, the reason is what this prints.
    assert fusedtech.why_unavailable("cpu", "cpu") is None, fusedtech.why_unavailable("cpu", "cpu")


def test_cuda_backend_reason_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    why = fusedtech.why_unavailable("cuda", "cuda")
    assert why is not None and "GPU" in why


def test_use_backend_overrides_and_restores():
    assert _backend.requested_backend() in (None, os.environ.get("FUSEDTECH_BACKEND"))
    with fusedtech.use_backend("torch"):
        assert _backend.select("adam_step", torch.device("cpu"), ("cpu", "torch")) == "torch"
        with fusedtech.use_backend("cpu"):
            assert _backend.select("adam_step", torch.device("cpu"), ("cpu", "torch")) == "cpu"
        assert _backend.requested_backend() == "torch"


def test_requested_unavailable_backend_raises_with_reason():
    with fusedtech.use_backend("cuda"):
        with pytest.raises(fusedtech.BackendUnavailableError, match="cuda.*CPU tensors|cuda.*unavailable"):
            _backend.select("adam_step", torch.device("cpu"), ("cuda", "cpu", "torch"))


def test_requested_backend_not_implemented_raises():
    with fusedtech.use_backend("triton"):
        with pytest.raises(fusedtech.BackendUnavailableError, match="no triton implementation"):
            _backend.select("some_op", torch.device("cpu"), ("cpu", "torch"))


def test_unknown_backend_name():
    with pytest.raises(fusedtech.BackendUnavailableError, match="unknown backend"):
        with fusedtech.use_backend("tpu"):
            pass


def test_env_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("FUSEDTECH_BACKEND", "torch")
    assert _backend.select("adam_step", torch.device("cpu"), ("cpu", "torch")) == "torch"
    monkeypatch.setenv("FUSEDTECH_BACKEND", "cuda")
    with pytest.raises(fusedtech.BackendUnavailableError):
        _backend.select("adam_step", torch.device("cpu"), ("cpu", "torch", "cuda"))


def test_automatic_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # An op with no cpu implementation falls back to torch on CPU tensors, without a warning:
        # torch is the only implementation it has for that device.
        assert _backend.select("op_a", torch.device("cpu"), ("torch",)) == "torch"
    assert not caught
    monkeypatch.setattr(_backend, "why_unavailable",
                        lambda b, d: "pretend not built" if b == "cpu" else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _backend.select("op_b", torch.device("cpu"), ("cpu", "torch")) == "torch"
        assert _backend.select("op_b", torch.device("cpu"), ("cpu", "torch")) == "torch"
    assert len(caught) == 1 and "pretend not built" in str(caught[0].message)


def test_python_m_fusedtech_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "fusedtech"], capture_output=True, text=True, check=True).stdout
    for name in ("cuda", "triton", "cpu", "torch"):
        assert f"  {name}" in out
    assert torch.__version__ in out
    assert "GPU" in out


def test_automatic_order_on_cuda_is_per_op(monkeypatch):
    # With every backend available on a GPU: LayerNorm takes Triton first (measured faster on an
    # H100), the other ops the CUDA C++ kernels; an unavailable first choice falls through.
    monkeypatch.setattr(_backend, "why_unavailable", lambda name, device_type: None)
    monkeypatch.delenv("FUSEDTECH_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert _backend.select("layer_norm", cuda, ("cuda", "triton", "cpu", "torch")) == "triton"
    assert _backend.select("adam_step", cuda, ("cuda", "triton", "cpu", "torch")) == "cuda"
    monkeypatch.setattr(_backend, "why_unavailable", lambda name, device_type: "absent" if name == "triton" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _backend.select("layer_norm", cuda, ("cuda", "triton", "cpu", "torch")) == "cuda"


def test_large_lists_go_to_triton_first_on_cuda(monkeypatch):
    # The automatic order, with every backend pretending to be available: measured preferences.
    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device_type: None)
    cuda, impl = torch.device("cuda"), ("cuda", "triton", "cpu", "torch")
    big = _backend.LARGE_LIST_ELEMENTS
    assert _backend.select("adam_step", cuda, impl) == "cuda"
    assert _backend.select("adam_step", cuda, impl, elements=big - 1) == "cuda"
    assert _backend.select("adam_step", cuda, impl, elements=big) == "triton"
    assert _backend.select("layer_norm", cuda, impl) == "triton"
    assert _backend.select("batch_norm", cuda, impl) == "triton"  # CUDA C++ BatchNorm: not yet run on a GPU
    assert _backend.select("adam_step", torch.device("cpu"), impl, elements=big) == "cpu"
    with _backend.use_backend("cuda"):  # asking wins over the size rule
        assert _backend.select("adam_step", cuda, impl, elements=big) == "cuda"


def test_float64_inputs_go_to_a_backend_with_float64_kernels(monkeypatch):
    # Triton's and the CUDA C++ kernels take fp32/fp16/bf16; torch runs float64 anywhere, so the
    # automatic choice for a float64 input on a GPU is the reference. Asked for by name, a backend
    # still gets it (and its kernels say they cannot).
    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device_type: None)
    monkeypatch.delenv("FUSEDTECH_BACKEND", raising=False)
    cuda, cpu, impl = torch.device("cuda"), torch.device("cpu"), ("cuda", "triton", "cpu", "torch")
    for op in ("layer_norm", "batch_norm", "dropout"):
        assert _backend.select(op, cuda, impl) in ("cuda", "triton")
        assert _backend.select(op, cuda, impl, float64=True) == "torch"
        assert _backend.select(op, cpu, impl, float64=True) == "cpu"
        with _backend.use_backend("triton"):
            assert _backend.select(op, cuda, impl, float64=True) == "triton"
    from fusedtech.ops.layer_norm import FORWARD
    fn = FORWARD.pick(cuda, float64=True)
    from fusedtech.reference import layer_norm as reference
    assert fn is reference.layer_norm_fwd


def test_kernels_never_run_on_a_gpu_are_not_the_automatic_choice(monkeypatch):
    # The CUDA C++ BatchNorm, DropBlock and dropout+add+LayerNorm kernels compile here but have not
    # run on a GPU: Triton's (measured) go first; asked for by name, the CUDA ones run.
    monkeypatch.setattr(_backend, "why_unavailable", lambda backend, device_type: None)
    monkeypatch.delenv("FUSEDTECH_BACKEND", raising=False)
    cuda, impl = torch.device("cuda"), ("cuda", "triton", "cpu", "torch")
    for op in ("batch_norm", "drop_block2d", "dropout_add_layer_norm"):
        assert _backend.select(op, cuda, impl) == "triton"
        with _backend.use_backend("cuda"):
            assert _backend.select(op, cuda, impl) == "cuda"


def test_python_m_fusedtech_reports_an_unknown_backend_name_instead_of_dying():
    # The command users run to see what is wrong: it names the bad value and exits non-zero.
    env = dict(os.environ, FUSEDTECH_BACKEND="cudaa")
    proc = subprocess.run([sys.executable, "-m", "fusedtech"], capture_output=True, text=True, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 1
    assert "requested invalid" in proc.stdout and "'cudaa'" in proc.stdout and "FUSEDTECH_BACKEND" in proc.stdout
    for name in ("cuda", "triton", "cpu", "torch"):
        assert f"  {name}" in proc.stdout


@pytest.mark.parametrize("automatic", ["", "auto", None])
def test_empty_auto_and_none_mean_the_automatic_choice_everywhere(monkeypatch, automatic):
    # One rule for use_backend() and FUSEDTECH_BACKEND; use_backend's choice wins over the variable.
    monkeypatch.setenv("FUSEDTECH_BACKEND", "torch")
    with fusedtech.use_backend(automatic):
        assert _backend.requested_backend() is None
    if automatic is not None:
        monkeypatch.setenv("FUSEDTECH_BACKEND", automatic)
        assert _backend.requested_backend() is None


def test_every_implementation_table_entry_resolves_to_a_callable():
    """A misspelt kernel name in any op family's table fails here, for every backend that can load
    on this machine (the compiled ops need the extension; Triton's entries need triton)."""
    import importlib
    import pkgutil

    import fusedtech.ops as ops
    tables = []
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        tables += [v for v in vars(module).values() if isinstance(v, _backend.Implementations)]
    assert {t.op for t in tables} >= {"layer_norm", "batch_norm", "dropout", "dropout_add_layer_norm", "drop_block2d",
                                      "group_norm", "adam_step", "sgd_step", "rmsprop_step", "adagrad_step",
                                      "lamb_step", "multi_tensor_norm"}
    # The compiled entries are torch.ops.fusedtech_C's, whose schemas the cpu extension defines
    # (with or without a GPU).
    loadable = ({"torch"} | ({"triton"} if _backend._triton_importable()[0] else set())
                | ({"cpu", "cuda"} if _backend.cpu_extension() is not None else set()))
    for table in tables:
        for backend in table.implemented:
            if backend in loadable:
                entry = table.entries[backend]()
                assert callable(entry) or hasattr(entry, "drop_block_apply"), (table.op, backend)
