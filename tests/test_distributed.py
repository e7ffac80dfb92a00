"""DDP and FSDP2 with fusedtech's optimizers and modules: two CPU processes over gloo
(tests/dist_worker.py), compared with the same training under torch's optimizers and modules."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
TOL32 = 1e-5  # fp32 after three steps: our kernels and torch's differ by rounding only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode: str) -> dict:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(3):  # the free port can be taken between choosing it and binding it: choose again
        proc = subprocess.run([sys.executable, WORKER, mode, str(_free_port())], capture_output=True, text=True,
                              timeout=600, env=env)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_ddp_matches_torch():
    out = _run("ddp")
    for name, diff in out["max_param_diff"].items():
        assert diff <= TOL32, (name, diff)
    assert out["clip_total"][0] == pytest.approx(out["clip_total"][1], rel=1e-6)
    # LAMB over replicas: the same steps and norm state as single-process LAMB on the whole batch
    assert out["lamb"]["max_param_diff"] <= TOL32, out["lamb"]
    assert out["lamb"]["max_norm_state_diff"] <= TOL32, out["lamb"]


def test_fsdp2_matches_torch_keeps_dtensor_state_and_runs_lamb_over_shards():
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 (fully_shard) is not in this torch")
    from torch.distributed import fsdp
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (fully_shard) is not in this torch")
    out = _run("fsdp")
    for name, diff in out["max_param_diff"].items():
        assert diff <= TOL32, (name, diff)
    # The states stay DTensors, as torch's optimizers keep them: checkpoints load both ways.
    assert all(out["state_is_dtensor"].values()), out["state_is_dtensor"]
    assert out["clip_total"][0] == pytest.approx(out["clip_total"][1], rel=1e-6)
    # LAMB over shards: each tensor's norms summed across the shards, so the trust ratios, the
    # steps and the norm state are single-process LAMB's; a distributed checkpoint resumes exactly.
    assert out["lamb"]["max_param_diff"] <= TOL32, out["lamb"]
    assert out["lamb"]["max_norm_state_diff"] <= TOL32, out["lamb"]
    assert out["lamb"]["resumed_max_param_diff"] <= TOL32, out["lamb"]
