"""CPU compatibility layer: applied only on request, idempotent; guards for the silent
Megatron-Core traps (the interleaved-pipeline correctness itself is pinned by
tests/test_router_parallel.py::test_interleaved_pipeline_routes_like_single_rank)."""

import subprocess
import sys
import types

import pytest
import torch

from regate_megatron.cpu_compat import (
    check_distrib_optim_sharding,
    fix_optimizer_step_after_load,
    guard_pipeline_p2p,
)


def test_import_patches_nothing_and_apply_is_idempotent():
    code = (
        "import torch; before = (torch.zeros, torch.cuda.current_device, torch.Tensor.cuda)\n"
        "import regate_megatron.cpu_compat as c\n"
        "assert (torch.zeros, torch.cuda.current_device, torch.Tensor.cuda) == before\n"
        "assert not c.cpu_compat_applied()\n"
        "c.apply_cpu_compat(); once = (torch.zeros, torch.cuda.current_device, torch.Tensor.cuda)\n"
        "c.apply_cpu_compat(); assert (torch.zeros, torch.cuda.current_device, torch.Tensor.cuda) == once\n"
        "assert c.cpu_compat_applied() and once != before\n"
        "assert torch.zeros(2, device='cuda').device.type == 'cpu'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _cfg(pp, vpp, batch=True):
    return types.SimpleNamespace(pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, batch_p2p_comm=batch)


def test_guard_turns_off_batched_p2p_only_where_it_corrupts():
    cfg = _cfg(2, 2)
    assert guard_pipeline_p2p(cfg, "gloo") and cfg.batch_p2p_comm is False
    for cfg, backend in [(_cfg(2, 2), "nccl"), (_cfg(4, 2), "gloo"), (_cfg(2, None), "gloo")]:
        assert not guard_pipeline_p2p(cfg, backend) and cfg.batch_p2p_comm is True


def test_unsaveable_distributed_optimizer_sharding_is_refused():
    with pytest.raises(ValueError, match="distrib_optim_sharding_type.*fully_reshardable"):
        check_distrib_optim_sharding("fully_sharded_model_space")
    check_distrib_optim_sharding("dp_reshardable")
    check_distrib_optim_sharding("fully_reshardable")


def test_shared_adam_step_is_split_after_load():
    params = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    reference = [torch.nn.Parameter(torch.ones(2)) for _ in range(3)]
    opt, ref = torch.optim.Adam(params, lr=0.1), torch.optim.Adam(reference, lr=0.1)
    for o, ps in ((opt, params), (ref, reference)):
        for p in ps:
            p.grad = torch.full_like(p, 0.5)
        o.step()
    shared = torch.tensor(1.0)  # what a distributed-optimizer load leaves behind
    for state in opt.state.values():
        state["step"] = shared
    assert fix_optimizer_step_after_load(opt) == 2
    opt.step(), ref.step()
    assert [float(s["step"]) for s in opt.state.values()] == [2.0, 2.0, 2.0]
    for p, r in zip(params, reference):
        assert torch.equal(p, r)  # the same bias correction as an uninterrupted run
