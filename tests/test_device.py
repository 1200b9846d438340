"""Devices: the CPU path explicitly, auto resolving here, CUDA refused where there is none,
GPU shares reaching Flower's backend config; and, where a GPU exists, CUDA equal to the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import simulate
from conf.schema import default_config, validate
from gating.federated.nodes import node_task
from gating.federated.settings import initial_parameters, model_spec, resolve_device
from gating.federated.updates import ClientRound, client_update
from gating.meta import MetaConfig, meta_gradients
from tests.support import run_simulate, summary_of

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")


def small_config(**changes):
    cfg = default_config()
    cfg.federation.train_nodes, cfg.federation.target_nodes = 4, 2
    cfg.federation.clients_per_round = 2
    cfg.model.width = 16
    for key, value in changes.items():
        section, leaf = key.split("__") if "__" in key else (None, key)
        (cfg[section] if section else cfg)[leaf] = value
    return validate(cfg)


def update_of(cfg) -> dict[str, torch.Tensor]:
    task = node_task(cfg, {"partition-id": 1, "num-partitions": 6})
    params = initial_parameters(model_spec(cfg, task), cfg.seed)
    return client_update(ClientRound(cfg, task, params, server_round=3, reg_weight=0.5)).update


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: auto is not the CPU")
def test_auto_is_the_cpu_here_and_device_cpu_computes_the_same():
    assert resolve_device("auto") == torch.device("cpu")
    auto, cpu = update_of(small_config()), update_of(small_config(device="cpu"))
    for name, value in auto.items():
        assert value.device.type == "cpu"
        torch.testing.assert_close(cpu[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("setting", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_a_malformed_device_is_refused_naming_the_key(setting):
    with pytest.raises(ValueError, match="config key device"):
        small_config(device=setting)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize(
    ("overrides", "named"),
    [(["device=cuda"], "device=cuda"), (["ray.client_gpus=0.5"], "ray.client_gpus=0.5")],
)
def test_cuda_asked_where_there_is_none_fails_before_ray_starts(
    tmp_path, subprocess_env, overrides, named
):
    result = run_simulate(subprocess_env, *overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr and "Ray" not in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr  # one line naming the key and the fix


def test_gpu_shares_reach_flowers_backend_config(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    shared = simulate.backend_config(small_config(device="cuda"))
    # 2 CPUs, 1 per actor: 2 actors share one GPU by default; Ray may use both GPUs
    assert shared["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert shared["init_args"]["num_gpus"] == 2
    quarter = simulate.backend_config(small_config(device="cuda", ray__client_gpus=0.25))
    assert quarter["client_resources"]["num_gpus"] == 0.25
    cpu = simulate.backend_config(small_config(device="cpu"))
    assert cpu["client_resources"]["num_gpus"] == 0.0
    with pytest.raises(ValueError, match="device=cuda:2"):
        simulate.backend_config(small_config(device="cuda:2"))


def test_batched_episodes_compute_the_loops_update():
    """task.batched: one vmapped pass over the client's episodes. Dense (no gate noise), it
    equals the loop; gated, the two draw their noise differently, so only the shapes agree."""
    loop = update_of(small_config(strategy__name="fedmeta", task__tasks_per_client=3))
    batched = update_of(
        small_config(
            strategy__name="fedmeta",
            task__tasks_per_client=3,
            task__batched=True,
        )
    )
    for name, value in loop.items():
        torch.testing.assert_close(batched[name], value, rtol=1e-4, atol=1e-6)
    gated = update_of(small_config(task__tasks_per_client=3, task__batched=True))
    assert set(gated) == set(loop) | {n for n in gated if n.startswith("gate.")}
    assert all(torch.isfinite(t).all() for t in gated.values())


@pytest.mark.gpu
@needs_cuda
def test_meta_gradients_on_cuda_equal_the_cpu_ones(digits_episodes, tiny_model):
    support, query = digits_episodes[0]
    model, params = tiny_model()
    cfg = MetaConfig(
        backbone_lr=0.3, gate_lr=0.3, reg_weight=0.5, target_ratio=0.3, cost="expected"
    )
    cfg = replace(cfg, train_gates="soft")
    # the same noise on both devices: uniform values from the CPU generator
    noise = torch.Generator().manual_seed(0)

    def fixed(like, *args, **kwargs):
        return torch.rand(like.shape, generator=noise, dtype=like.dtype).to(like.device)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "rand_like", fixed)
        cpu = meta_gradients(model, params, support, query, cfg).grads
        noise.manual_seed(0)
        cuda = meta_gradients(
            model.cuda(),
            {n: t.cuda() for n, t in params.items()},
            type(support)(support.x.cuda(), support.y.cuda()),
            type(query)(query.x.cuda(), query.y.cuda()),
            cfg,
        ).grads
    for name, value in cpu.items():
        torch.testing.assert_close(cuda[name].cpu(), value, rtol=1e-7, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.ray
@needs_cuda
def test_a_simulation_with_half_a_gpu_per_client_writes_its_summary(tmp_path, subprocess_env):
    run = tmp_path / "run"
    result = run_simulate(
        subprocess_env,
        "federation=tiny",
        "device=cuda",
        "ray.client_gpus=0.5",
        "output.plots=false",
        f"hydra.run.dir={run}",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary_of(run)["rounds"] == 3
