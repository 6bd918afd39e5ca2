"""Multi-process training on CPU: tools/dist_train.sh (torchrun, 2 processes) and kim_plugins.mmseg.distributed."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.config import Config

import kim_plugins.mmseg.distributed as kd

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SMOKE = os.path.join(REPO, "configs", "smoke", "fcn_r18-tiny-d8_1xb2-4i_stare-32x32.py")

# A test-only hook: each rank dumps its state before and after training, and the
# per-iteration losses and a BN running mean *before* SyncBuffersPerIterHook runs.
_DUMP_HOOK = textwrap.dedent('''
    import torch
    from mmengine.dist import get_rank
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS


    @HOOKS.register_module()
    class RankStateDumpHook(Hook):
        priority = "ABOVE_NORMAL"  # after_train_iter: before SyncBuffersPerIterHook (NORMAL)

        def before_train(self, runner):
            self.init = {k: v.detach().clone() for k, v in runner.model.module.state_dict().items()}
            self.losses, self.pre_sync_mean = [], []
            self.bn_name, self.bn = next((n, m) for n, m in runner.model.module.named_modules()
                                         if getattr(m, "running_mean", None) is not None)

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.losses.append(float(outputs["loss"]))
            self.pre_sync_mean.append(self.bn.running_mean.detach().clone())

        def after_run(self, runner):
            model = runner.model
            torch.save(dict(
                wrapper=type(model).__name__,
                norm_types=sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}),
                world_size=torch.distributed.get_world_size(),
                init=self.init, state=model.module.state_dict(),
                optim=runner.optim_wrapper.state_dict(), losses=self.losses,
                pre_sync_mean=self.pre_sync_mean, bn_name=self.bn_name),
                f"{runner.work_dir}/rank{get_rank()}.pt")
''')


def test_two_cpu_processes_train_to_identical_parameters_and_optimizer_state(tmp_path):
    """tools/dist_train.sh CONFIG 2 --tiny auto on CPU: gloo, CPU DDP wrapper, SyncBN -> BN; ranks end identical."""
    (tmp_path / "rank_state_dump.py").write_text(_DUMP_HOOK)
    cfg = tmp_path / "fcn_r18-tiny-d8_2xb2-3i_stare-32x32.py"
    cfg.write_text(f"_base_ = [{SMOKE!r}]\n"
                   "custom_imports = dict(imports=['kim_plugins.mmseg', 'rank_state_dump'], "
                   "allow_failed_imports=False)\n"
                   "custom_hooks = [dict(type='RankStateDumpHook')]\n")
    work = tmp_path / "work"
    env = dict(os.environ, PYTHON=sys.executable, PORT="29531", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=str(tmp_path))
    cmd = ["bash", os.path.join(REPO, "tools", "dist_train.sh"), str(cfg), "2", "--work-dir", str(work),
           "--tiny", "auto", "--tiny-iters", "3", "--tiny-crop", "32", "32",  # the one-command dry run
           # the GPU config's norm: SyncBN, which the CPU launch must turn into BN
           "--cfg-options", "model.backbone.norm_cfg.type=SyncBN", "model.decode_head.norm_cfg.type=SyncBN",
           "model.auxiliary_head.norm_cfg.type=SyncBN", "env_cfg.dist_cfg.backend=nccl"]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    log = proc.stdout + proc.stderr
    assert "env_cfg.dist_cfg.backend: 'nccl' -> 'gloo'" in log
    assert "3 SyncBN norm config(s) -> BN" in log
    for rank in (0, 1):  # --tiny auto wrote the config's dataset layout, one copy per process
        assert os.path.isfile(work / "tiny_data" / f"rank{rank}" / "stare" / "annotations" / "training"
                              / "training_0000.ah.png")

    r0, r1 = (torch.load(work / f"rank{r}.pt", weights_only=False) for r in (0, 1))  # this test's own files
    for r in (r0, r1):
        assert r["wrapper"] == "CPUCapableDistributedDataParallel"
        assert r["world_size"] == 2
        assert "SyncBatchNorm" not in r["norm_types"] and "BatchNorm2d" in r["norm_types"]
        assert len(r["losses"]) == 3
    # the ranks saw different data (else equal parameters would prove nothing) ...
    assert r0["losses"] != r1["losses"]
    # ... and still hold identical parameters, which training changed
    params = [k for k, v in r0["state"].items() if "running" not in k and "num_batches" not in k]
    assert params
    changed = [k for k in params if not torch.equal(r0["init"][k], r0["state"][k])]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("decode_head.") for k in changed)
    for k in params:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    # identical optimizer state (SGD momentum buffers) and schedule
    s0, s1 = r0["optim"]["state"], r1["optim"]["state"]
    assert s0.keys() == s1.keys() and len(s0) > 0
    for i in s0:
        for name in s0[i]:
            assert torch.equal(torch.as_tensor(s0[i][name]), torch.as_tensor(s1[i][name])), (i, name)
    assert [g["lr"] for g in r0["optim"]["param_groups"]] == [g["lr"] for g in r1["optim"]["param_groups"]]
    # BN policy: per-rank running statistics differ before each sync, agree after it
    assert not torch.equal(r0["pre_sync_mean"][0], r1["pre_sync_mean"][0])
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    # the averaged running mean is the mean of the two ranks' pre-sync values
    torch.testing.assert_close(r0["state"][r0["bn_name"] + ".running_mean"],
                               (r0["pre_sync_mean"][-1] + r1["pre_sync_mean"][-1]) / 2, rtol=0, atol=0)


# --------------------------------------------------------------------------- config rewrite

def _smoke_with_sync_bn() -> Config:
    cfg = Config.fromfile(SMOKE)
    for part in ("backbone", "decode_head", "auxiliary_head"):
        cfg.model[part].norm_cfg = dict(type="SyncBN", requires_grad=True)
    cfg.env_cfg.dist_cfg = dict(backend="nccl", timeout=60)
    cfg.launcher = "pytorch"
    return cfg


def test_prepare_cpu_distributed_rewrites_each_gpu_only_setting():
    cfg = _smoke_with_sync_bn()
    cfg.sync_bn = "torch"
    changes = kd.prepare_cpu_distributed(cfg)
    assert cfg.env_cfg.dist_cfg.backend == "gloo" and cfg.env_cfg.dist_cfg.timeout == 60
    assert "SyncBN" not in cfg.pretty_text
    assert [cfg.model[p].norm_cfg.type for p in ("backbone", "decode_head", "auxiliary_head")] == ["BN"] * 3
    assert cfg.get("sync_bn") is None
    assert cfg.model_wrapper_cfg == dict(type="CPUCapableDistributedDataParallel", broadcast_buffers=False,
                                         find_unused_parameters=False)
    assert [h["type"] for h in cfg.custom_hooks] == ["SyncBuffersPerIterHook"]
    assert len(changes) == 5
    assert kd.prepare_cpu_distributed(cfg) == []  # idempotent


def test_prepare_keeps_wrapper_arguments_and_rejects_non_ddp_wrappers():
    cfg = _smoke_with_sync_bn()
    cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", find_unused_parameters=True)
    kd.prepare_cpu_distributed(cfg)
    assert cfg.model_wrapper_cfg == dict(type="CPUCapableDistributedDataParallel", find_unused_parameters=True)
    cfg = _smoke_with_sync_bn()
    cfg.model_wrapper_cfg = dict(type="MMFullyShardedDataParallel")
    with pytest.raises(ValueError, match="MMFullyShardedDataParallel.*cannot run on CPU"):
        kd.prepare_cpu_distributed(cfg)


def test_setup_launch_changes_nothing_with_an_accelerator_or_without_launcher(monkeypatch):
    cfg = _smoke_with_sync_bn()
    before = cfg.pretty_text
    monkeypatch.setattr(kd, "accelerator_absent", lambda: False)  # a GPU machine
    assert kd.setup_launch(cfg) == []
    assert cfg.pretty_text == before
    monkeypatch.setattr(kd, "accelerator_absent", lambda: True)
    cfg.launcher = "none"
    before = cfg.pretty_text
    assert kd.setup_launch(cfg) == []
    assert cfg.pretty_text == before


def test_init_cpu_dist_slurm_environment_and_errors(monkeypatch):
    seen = {}
    monkeypatch.setattr(kd.torch_dist, "init_process_group", lambda **kw: seen.update(kw))
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "node[1-2]")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    kd.init_cpu_dist("slurm", backend="gloo", port=29999, timeout=60)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"], os.environ["MASTER_PORT"]) \
        == ("3", "4", "1", "29999")
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 60
    with pytest.raises(ValueError, match="'nccl' cannot run on CPU"):
        kd.init_cpu_dist("pytorch", backend="nccl")
    with pytest.raises(ValueError, match="launcher 'local'"):
        kd.init_cpu_dist("local")


def test_cpu_wrapper_drops_device_ids_and_reverts_sync_bn(tmp_path):
    import torch.distributed as dist
    from mmengine.registry import MODEL_WRAPPERS
    from mmseg.registry import MODELS

    cfg = Config.fromfile(SMOKE)
    cfg.model.backbone.norm_cfg = dict(type="SyncBN", requires_grad=True)
    import mmseg.models  # noqa: F401
    from mmengine.registry import init_default_scope
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        # exactly what Runner.wrap_model passes for a registered DDP subclass
        wrapped = MODEL_WRAPPERS.build(dict(type="CPUCapableDistributedDataParallel", broadcast_buffers=False),
                                       default_args=dict(module=model, device_ids=[0]))
        assert wrapped.device_ids is None
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.modules())
        out = wrapped.module(torch.randn(2, 3, 32, 32), mode="tensor")
        assert out.shape == (2, 2, 4, 4) and torch.isfinite(out).all()
    finally:
        dist.destroy_process_group()


def test_sync_buffers_per_iter_hook_is_mmengines_sync_buffers_hook(tmp_path):
    import torch.distributed as dist
    from types import SimpleNamespace

    from mmengine.hooks import SyncBuffersHook
    from mmengine.registry import HOOKS

    hook = HOOKS.build(dict(type="SyncBuffersPerIterHook"))
    assert isinstance(hook, SyncBuffersHook) and hook.priority == "NORMAL"
    runner = SimpleNamespace(model=torch.nn.BatchNorm1d(2))
    hook.after_train_iter(runner, 0)  # outside a process group: nothing to average
    assert not hook.called_in_train
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        hook = HOOKS.build(dict(type="SyncBuffersPerIterHook"))  # as a runner builds it: in the process group
        runner.model.running_mean.fill_(0.5)
        hook.after_train_iter(runner, 0)
        assert hook.called_in_train  # so the base class's before_val_epoch has nothing left to average
        assert torch.equal(runner.model.running_mean, torch.full((2,), 0.5))
        hook.before_val_epoch(runner)
        assert not hook.called_in_train
    finally:
        dist.destroy_process_group()
