"""Run by tests/test_distributed.py in its own processes: `python dist_worker.py MODE PORT` trains a
small model on 2 CPU processes (gloo) under DDP or FSDP2 with fusedtech's optimizers and modules and
with torch's, and prints, from rank 0, one JSON line of what the test asserts."""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OPTIMIZERS = [("Adam", {"lr": 1e-2}), ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
              ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}), ("RMSprop", {"lr": 1e-2, "momentum": 0.5}),
              ("Adagrad", {"lr": 0.1})]


def _model(fused: bool):
    import fusedtech
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    if fused:
        fusedtech.nn.convert_model(model)
    return model


def _wrap(model, mode):
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def _train(model, opt, rank, steps=3):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(steps):
        x = torch.randn(6, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


LAMB_KWARGS = {"lr": 1e-2, "weight_decay": 0.01, "exclude_bias_and_norm": True}


def _lamb_batches(rank, steps):
    """Each rank's batches, and (what a single process trains on for the same gradients) both
    ranks' batches side by side: the wrappers average the ranks' gradients of equal batches."""
    mine = [torch.randn(6, 8, generator=torch.Generator().manual_seed(200 + 10 * s + rank)) for s in range(steps)]
    both = [torch.cat([torch.randn(6, 8, generator=torch.Generator().manual_seed(200 + 10 * s + r)) for r in (0, 1)])
            for s in range(steps)]
    return mine, both


def _lamb_train(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _lamb(rank, world, mode):
    """LAMB over DTensor shards (FSDP2) or replicas (DDP) against single-process LAMB on the whole
    batch: parameters and the weight_norm / adam_norm / trust_ratio state after 3 steps; under FSDP2
    also a torch.distributed.checkpoint save after 2 steps, loaded into a fresh model and optimizer
    that take the third step."""
    from fusedtech import optim
    steps = 3
    mine, both = _lamb_batches(rank, steps)
    dist_model = _wrap(_model(True), mode)
    single = _model(True)
    dist_opt, single_opt = optim.LAMB(dist_model.parameters(), **LAMB_KWARGS), optim.LAMB(single.parameters(), **LAMB_KWARGS)
    _lamb_train(dist_model, dist_opt, mine)
    _lamb_train(single, single_opt, both)
    result = {"max_param_diff": max((_full(a) - b.detach()).abs().max().item()
                                    for a, b in zip(dist_model.parameters(), single.parameters()))}
    result["max_norm_state_diff"] = max(
        (dist_opt.state[a][key] - single_opt.state[b][key]).abs().item()
        for a, b in zip(dist_model.parameters(), single.parameters()) for key in ("weight_norm", "adam_norm", "trust_ratio"))
    if mode == "fsdp":
        import tempfile
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        first = _wrap(_model(True), mode)
        first_opt = optim.LAMB(first.parameters(), **LAMB_KWARGS)
        _lamb_train(first, first_opt, mine[:2])
        path = [tempfile.mkdtemp() if rank == 0 else None]
        dist.broadcast_object_list(path)
        model_sd, optim_sd = get_state_dict(first, first_opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path[0])
        resumed = _wrap(_model(True), mode)
        resumed_opt = optim.LAMB(resumed.parameters(), **LAMB_KWARGS)
        model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=path[0])
        set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        _lamb_train(resumed, resumed_opt, mine[2:])
        result["resumed_max_param_diff"] = max((_full(a) - _full(b)).abs().max().item()
                                               for a, b in zip(resumed.parameters(), dist_model.parameters()))
    return result


def worker(rank, world, mode, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fusedtech
    from fusedtech import optim
    out = {"max_param_diff": {}, "state_is_dtensor": {}}
    for name, kwargs in OPTIMIZERS:
        fused, ref = _wrap(_model(True), mode), _wrap(_model(False), mode)
        fopt = getattr(optim, name)(fused.parameters(), **kwargs)
        ropt = getattr(torch.optim, name)(ref.parameters(), **kwargs)
        _train(fused, fopt, rank), _train(ref, ropt, rank)
        diff = max((_full(a) - _full(b)).abs().max().item() for a, b in zip(fused.parameters(), ref.parameters()))
        out["max_param_diff"][name] = diff
        states = [t for s in fopt.state.values() for k, t in s.items() if torch.is_tensor(t) and k != "step"]
        out["state_is_dtensor"][name] = all(type(t).__name__ == "DTensor" for t in states) and bool(states)
    # Gradient clipping: the total norm spans both processes' shards, as torch's.
    fused, ref = _wrap(_model(True), mode), _wrap(_model(False), mode)
    for m in (fused, ref):
        m(torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))).square().mean().backward()
    out["clip_total"] = [float(fusedtech.nn.utils.clip_grad_norm_(fused.parameters(), 0.1)),
                         float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1))]
    out["lamb"] = _lamb(rank, world, mode)
    if rank == 0:
        print(json.dumps(out), flush=True)
    # Both ranks past every collective before either tears gloo down: without it a rank sometimes
    # aborted at exit ("terminate called without an active exception"), 1 run in 3-6 here.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, sys.argv[1], int(sys.argv[2])), nprocs=2)
