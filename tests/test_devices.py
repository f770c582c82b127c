"""The GPU paths, checked without a GPU (issue 12).

A model on the ``meta`` device under :class:`devices.StrictDevices` stands in for a model on a
GPU: a CPU tensor that reaches it fails here as it would on CUDA. What torch reports about CUDA
(availability, device count, capability) and the OS reports about CPUs and shared memory is
patched where a test needs a GPU machine's answers.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import logging
import os
import threading

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from devices import DeviceMixError, StrictDevices
from featcache.common import devices as devmod
from featcache import extract
from featcache.backbones import load_backbone
from featcache.errors import ConfigError
from featcache.extraction.plan import ExtractConfig
from featcache.extraction.loading import Batch, DeviceDecoded
from featcache.backbones.taps import HostCopy, TappedForward, list_layers

META = torch.device("meta")
plan_mod = importlib.import_module("featcache.extraction.plan")


def _fake_cuda(monkeypatch, count: int = 2, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


# --- 1. every probe input on the model's device ----------------------------------------------

def test_strict_devices_catches_a_cpu_tensor_reaching_a_model_elsewhere():
    model = torch.nn.Conv2d(3, 4, 3).to(META)
    with StrictDevices(), pytest.raises(DeviceMixError, match="cpu.*meta"):
        model(torch.zeros(1, 3, 8, 8))


@pytest.mark.parametrize("layers", [["layer3"], ["layer2", "pre_logits"]])
def test_tapped_forward_on_another_device_feeds_it_only_its_own_tensors(layers):
    """predict's crash on CUDA: the model was moved, then list_layers probed it with a CPU tensor."""
    bb = load_backbone("resnet18.none", input_size=32)
    with StrictDevices():
        forward = TappedForward(bb, layers, "avg", device=META, precision="fp32")
        out = forward(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert list(out) == layers and all(v.device == META and v.shape[0] == 2 for v in out.values())


def test_list_layers_probes_a_moved_model_on_its_device():
    bb = load_backbone("resnet18.none", input_size=32)
    bb.model.to(META)
    with StrictDevices():
        infos = list_layers(bb, depth=None)
    assert {i.name for i in infos} >= {"layer4", "pre_logits"}


def test_predict_pipeline_on_another_device(tmp_path, tiny, image_folder):
    from featcache.runs.fit import fit_head
    from featcache.runs.saved import load_run
    from featcache.runs.inference import _Pipeline, _backbone_for

    cache = extract(str(image_folder), **tiny).cache
    run = load_run(fit_head(cache, head="ncm", output=str(tmp_path / "run")).run)
    bb = _backbone_for(run)
    with StrictDevices():
        pipe = _Pipeline(run, bb, META)
        out = pipe.forward(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert out[run.meta["layer"]].device == META


# --- 2. any cuda* device under torchrun is CUDA, one GPU per local rank ----------------------

@pytest.mark.parametrize("option, local_rank, count, expected", [
    ("cuda", 1, 2, "cuda:1"), ("cuda:0", 1, 2, "cuda:1"), ("auto", 3, 4, "cuda:3"),
    ("cuda", 3, 1, "cuda:0"),  # a scheduler gave each task its own CUDA_VISIBLE_DEVICES
    ("auto", 5, 4, "cuda:1"),
])
def test_rank_device_maps_local_rank_to_a_visible_gpu(monkeypatch, option, local_rank, count, expected):
    from featcache.extraction.distributed import rank_device

    _fake_cuda(monkeypatch, count)
    device = rank_device(option, local_rank)
    assert str(device) == expected and devmod.distributed_backend(device) == "nccl"


def test_rank_device_cpu_is_gloo():
    from featcache.extraction.distributed import rank_device

    device = rank_device("cpu", 1)
    assert device.type == "cpu" and devmod.distributed_backend(device) == "gloo"


class _Stop(Exception):
    pass


def _torchrun_env(monkeypatch, rank=1, local=1, world=2, local_world=2):
    for k, v in {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": local_world}.items():
        monkeypatch.setenv(k, str(v))


def test_torchrun_with_cuda_n_uses_nccl_and_the_rank_gpu(monkeypatch):
    import torch.distributed as dist
    from featcache.extraction import distributed

    _fake_cuda(monkeypatch, count=2)
    _torchrun_env(monkeypatch, rank=1, local=1)
    seen = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("device", torch.device(d)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def init(backend, **kw):
        seen["backend"] = backend
        raise _Stop

    monkeypatch.setattr(dist, "init_process_group", init)
    with pytest.raises(_Stop):
        distributed.extract_distributed("digits", ExtractConfig(device="cuda:0"))
    assert seen == {"device": torch.device("cuda", 1), "backend": "nccl"}


def test_torchrun_rank_builds_the_backbone_once_and_stats_only_its_share(monkeypatch, tmp_path, tiny):
    import torch.distributed as dist
    from featcache.extraction import distributed
    from featcache.sources import FileSource

    folder = make_image_folder(tmp_path / "imgs", per_class=8)  # 32 files
    _torchrun_env(monkeypatch, rank=1, local=0, world=2, local_world=1)
    built, stats = [], []
    real_load, real_stat = plan_mod.load_backbone, FileSource.stat
    monkeypatch.setattr(plan_mod, "load_backbone", lambda *a, **k: built.append(a) or real_load(*a, **k))
    monkeypatch.setattr(FileSource, "stat", lambda self, ref: stats.append(ref.id) or real_stat(self, ref))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as if the caller had initialised it
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)

    def gather(out, mine):
        raise _Stop

    monkeypatch.setattr(dist, "all_gather_object", gather)
    with pytest.raises(_Stop):
        distributed.extract_distributed(str(folder), ExtractConfig(**{**tiny, "device": "cpu"}))
    assert len(built) == 1
    assert 0 < len(stats) <= 16  # its half of the 32 files, no more


# --- 3. decoding processes from the usable CPUs, divided among local ranks --------------------

@pytest.mark.parametrize("cpus, local_world, expected", [(64, 1, 8), (64, 8, 7), (6, 2, 2), (2, 4, 1), (1, 1, 1)])
def test_default_workers_use_affinity_divided_by_local_ranks(monkeypatch, cpus, local_world, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(os, "cpu_count", lambda: 256)  # the machine's count must not be used
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert devmod.default_workers(torch.device("cuda", 0)) == expected  # files and arrays alike
    assert devmod.default_workers(torch.device("cpu")) == 0


# --- 4. post-processing on the device, one copy to the host per batch -------------------------

class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func._schema.name, [a.dtype for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_host_copy_equals_the_numpy_path_and_checks_on_the_device(src_dtype, dtype):
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(6, 10, generator=g) * 100).to(src_dtype)
    b = torch.randn(6, 3, 2, 2, generator=g).to(src_dtype)
    host = HostCopy(["a", "b"], dtype, torch.device("cpu"))
    with _Ops() as rec:
        pending = host.start({"a": a, "b": b}, 6)
    # The cast and the finiteness check are tensor operations (on the device), not numpy ones.
    target = getattr(torch, dtype)
    assert any(name in ("aten::isfinite", "aten::abs") and dtypes == [target] for name, dtypes in rec.ops)
    feats, views = host.finish(pending)
    assert views == []
    for got, t in zip(feats, (a, b)):
        want = t.float().numpy().astype(dtype)  # the old host-side path
        assert got.dtype == np.dtype(dtype) and np.array_equal(got.view(np.uint8), want.view(np.uint8))


def test_host_copy_refuses_values_that_overflow_the_cache_dtype():
    from featcache.errors import CacheError

    host = HostCopy(["x"], "float16", torch.device("cpu"))
    pending = host.start({"x": torch.full((2, 3), 1e6)}, 2)
    with pytest.raises(CacheError, match="not finite in float16.*float32"):
        host.finish(pending)


def test_host_copy_splits_augmented_views():
    """2 base crops then 2 views of each: rows 0-1 are features, rows 2-5 the views, image by image."""
    host = HostCopy(["x"], "float32", torch.device("cpu"))
    x = torch.arange(6 * 2, dtype=torch.float32).reshape(6, 2)
    feats, views = host.finish(host.start({"x": x}, 2))
    assert np.array_equal(feats[0], x[:2].numpy())
    assert np.array_equal(views[0], x[2:].numpy().reshape(2, 2, 2))


# --- 5. decoding on the device overlaps the forward pass ----------------------------------------

def test_device_decoding_runs_one_batch_ahead_of_the_forward_pass(monkeypatch):
    from featcache.backbones.preprocess import Encoded

    started = [threading.Event() for _ in range(4)]
    calls = []

    def fake_decode(items, pp, device):
        k = len(calls)
        calls.append(k)
        started[k].set()
        return [torch.zeros(3, 4, 4, dtype=torch.uint8) for _ in items], []

    monkeypatch.setattr(importlib.import_module("featcache.extraction.loading"), "decode_on_device", fake_decode)
    enc = Encoded(np.zeros(4, np.uint8), 1)
    loader = [Batch([2 * k, 2 * k + 1], ["h", "h"], [enc, enc], []) for k in range(4)]
    overlapped = []
    batches = DeviceDecoded(loader, None, torch.device("cpu"), background=True)
    try:
        for k, batch in enumerate(batches):
            assert batch.x.shape == (2, 3, 4, 4) and batch.rows == [2 * k, 2 * k + 1]
            if k + 1 < len(loader):  # "the forward pass of batch k": is batch k+1 being decoded?
                overlapped.append(started[k + 1].wait(timeout=10))
    finally:
        batches.close()
    assert overlapped == [True, True, True]


def test_device_decoding_inline_and_background_give_the_same_batches(monkeypatch, tmp_path, tiny):
    folder = make_image_folder(tmp_path / "imgs", per_class=5)
    opts = {**tiny, "decode_on_device": True}
    ref = extract(str(folder), **{**opts, "cache_dir": str(tmp_path / "a")})
    monkeypatch.setattr(DeviceDecoded, "__init__", _forced_background(DeviceDecoded.__init__))
    got = extract(str(folder), **{**opts, "cache_dir": str(tmp_path / "b")})
    from featcache import open_cache

    with open_cache(ref.cache) as a, open_cache(got.cache) as b:
        for s in a.splits:
            assert a.ids(s) == b.ids(s) and np.array_equal(a.load(s)[0], b.load(s)[0])


def _forced_background(init):
    def wrapped(self, loader, pp, device, *, background):
        init(self, loader, pp, device, background=True)
    return wrapped


# --- 6. shared memory ---------------------------------------------------------------------------

def test_prefetch_fits_shared_memory(caplog):
    batch = 64 * 3 * 224 * 224  # 9.6 MB
    assert devmod.prefetch_for_shm(8, batch, free=8 << 30) == devmod.PREFETCH
    assert devmod.prefetch_for_shm(0, batch, free=0) == devmod.PREFETCH
    with caplog.at_level(logging.WARNING):
        assert devmod.prefetch_for_shm(8, batch, free=200 << 20) == 1
    assert "--shm-size" in caplog.text
    with pytest.raises(ConfigError, match=r"/dev/shm has 64 MB free.*--shm-size 1g \(or --ipc=host\)"):
        devmod.prefetch_for_shm(8, batch, free=64 << 20)  # a default Docker container


def test_a_worker_bus_error_names_the_fix_and_keeps_what_was_done(monkeypatch, tmp_path, tiny):
    folder = make_image_folder(tmp_path / "imgs", per_class=4)
    real = torch.utils.data.DataLoader

    class Dying:
        def __init__(self, *a, **k):
            self.inner = real(*a, **k)

        def __iter__(self):
            it = iter(self.inner)
            yield next(it)
            yield next(it)
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible "
                               "that dataloader's workers are out of shared memory.")

    monkeypatch.setattr(torch.utils.data, "DataLoader", Dying)
    with pytest.raises(ConfigError, match=r"shared memory.*--shm-size 1g.*2 images finished are kept"):
        extract(str(folder), **{**tiny, "batch_size": 1, "checkpoint_every": 0})
    monkeypatch.setattr(torch.utils.data, "DataLoader", real)
    res = extract(str(folder), **{**tiny, "batch_size": 1, "checkpoint_every": 0})
    assert res.reused == 2 and res.computed == 14


# --- 8. precision follows the device --------------------------------------------------------

@pytest.mark.parametrize("capability, expected", [((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_on_gpus(monkeypatch, capability, expected):
    _fake_cuda(monkeypatch, capability=capability)
    assert devmod.resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_auto_precision_on_a_cpu_follows_its_native_bf16(monkeypatch):
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: True)
    assert devmod.resolve_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: False)
    assert devmod.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert devmod.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for: kept


def test_predict_runs_a_gpu_cache_in_fp32_on_a_cpu_without_bf16(monkeypatch, tmp_path, tiny, image_folder, caplog):
    from featcache.runs.fit import fit_head
    from featcache.runs.saved import load_run
    from featcache.runs.inference import _Pipeline, _backbone_for, predict

    cache = extract(str(image_folder), **{**tiny, "precision": "bf16"}).cache
    run_dir = fit_head(cache, head="ncm", output=str(tmp_path / "run")).run
    run = load_run(run_dir)
    assert run.meta["fingerprint"]["precision"] == "bf16"
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        pipe = _Pipeline(run, _backbone_for(run), torch.device("cpu"))
    assert pipe.precision == "fp32" and "no native bf16" in caplog.text
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: True)
    assert _Pipeline(run, _backbone_for(run), torch.device("cpu")).precision == "bf16"
    files = sorted(str(p) for p in (image_folder / "val").rglob("*.jpg"))
    assert all(r["label"] in run.classes for r in predict(run_dir, files, device="cpu"))


def test_runnable_precision_on_a_gpu_without_bf16(monkeypatch):
    _fake_cuda(monkeypatch, capability=(7, 5))
    assert devmod.runnable_precision("bf16", torch.device("cuda", 0))[0] == "fp16"
    assert devmod.runnable_precision("fp16", torch.device("cpu"))[0] == "fp32"


# --- 9. fine-tuning with the extraction's loader defaults, autocast, no per-step sync --------

def test_finetune_loader_on_a_gpu_pins_memory_and_decodes_in_processes(monkeypatch, tmp_path):
    from featcache.runs.finetuning import FinetuneConfig, _Images, _loader
    from featcache.sources import open_source

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    src = open_source(str(make_image_folder(tmp_path / "imgs", per_class=2)))
    ds = _Images(src, src.splits["train"], load_backbone("resnet18.none", input_size=32).preprocess)
    config = FinetuneConfig(freeze_until="layer3")
    gpu = _loader(ds, [0, 1], config, torch.device("cuda", 0))
    assert (gpu.num_workers, gpu.pin_memory) == (8, True)
    cpu = _loader(ds, [0, 1], config, torch.device("cpu"))
    assert (cpu.num_workers, cpu.pin_memory) == (0, False)
    # Prefetch sized to /dev/shm as in extraction: half of 3.5 MB holds 2 batches of 32 x 3 x 32 x 32 per worker.
    monkeypatch.setattr(importlib.import_module("featcache.runs.finetuning"), "shm_free_bytes", lambda: 7 << 19)
    assert _loader(ds, [0, 1], config, torch.device("cuda", 0)).prefetch_factor == 2


class _Syncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts device-to-host reads of a scalar (``float(t)``, ``t.item()``): a GPU sync each."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "aten::_local_scalar_dense":
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_finetune_reads_the_loss_once_per_epoch_not_once_per_step(tmp_path):
    from featcache.runs.finetuning import finetune

    folder = make_image_folder(tmp_path / "imgs", per_class=8, splits=("train",))
    with _Syncs() as syncs:
        res = finetune(str(folder), backbone="resnet18.none", input_size=32, freeze_until="layer3", epochs=2,
                       batch_size=2, device="cpu", output=str(tmp_path / "ft"))
    steps = 2 * 16 // 2
    assert len(res.per_epoch) == 2 and res.per_epoch[-1]["train_loss"] > 0
    assert syncs.n < steps // 2, f"{syncs.n} scalar reads for {steps} steps"


# --- 10. file locks on file systems without them ------------------------------------------------

def test_extraction_without_working_file_locks_warns_and_completes(monkeypatch, tiny, image_folder, caplog):
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING):
        res = extract(str(image_folder), **tiny)
    assert res.computed == 24 and "file locking is not supported" in caplog.text
    assert "would not be detected" in caplog.text


def test_cache_files_are_written_without_hdf5_file_locking(monkeypatch, tmp_path):
    from featcache.store.writer import create_h5

    with create_h5(tmp_path / "x.h5") as h:
        assert not h.id.get_access_plist().get_file_locking()[0]


def test_device_option_errors_name_the_visible_gpus(monkeypatch):
    _fake_cuda(monkeypatch, count=1)
    with pytest.raises(ConfigError, match=r"'cuda:3' does not exist: this process sees 1 GPU"):
        devmod.resolve_device("cuda:3")
    assert devmod.resolve_device("cuda:0") == torch.device("cuda", 0)
    assert ExtractConfig().device == "auto"


def test_an_explicit_slow_precision_is_kept_with_a_warning(monkeypatch, tiny, image_folder, caplog):
    monkeypatch.setattr(devmod, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        p = plan_mod.prepare(str(image_folder), ExtractConfig(**{**tiny, "device": "cpu", "precision": "bf16"}))
    assert p.config.precision == "bf16"
    assert "precision=bf16 on cpu is slow: this CPU has no native bf16 (emulated bf16 runs 18-30x slower)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_mod.prepare(str(image_folder), ExtractConfig(**{**tiny, "device": "cpu", "precision": "fp32"}))
    assert "slow" not in caplog.text


# --- found on the first GPU run (an H200): each failure there, shown on the CPU ----------------

@pytest.mark.parametrize("gpus, local_world, expected", [(1, 2, "gloo"), (2, 2, "nccl"), (1, 1, "nccl")])
def test_ranks_sharing_a_gpu_use_gloo_since_nccl_refuses_them(monkeypatch, gpus, local_world, expected):
    # On one H200, torchrun --nproc-per-node 2 failed in NCCL: "Duplicate GPU detected: rank 1 and rank 0
    # both on CUDA device".
    from featcache.common.devices import distributed_backend

    _fake_cuda(monkeypatch, count=gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert distributed_backend(torch.device("cuda", 0)) == expected
    assert distributed_backend(torch.device("cpu")) == "gloo"


def test_fp32_on_cuda_turns_tf32_off_and_restores_it():
    # On an H200 fp32 features differed from the CPU's by 2e-3: cuDNN used TF32 for convolutions.
    from featcache.common.devices import autocast, cudnn_autotuning

    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with autocast(torch.device("cuda"), "fp32"):
            assert flags() == (False, False)
        assert flags() == (True, True)
        with autocast(torch.device("cpu"), "fp32"):
            assert flags() == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    benchmark = torch.backends.cudnn.benchmark
    with cudnn_autotuning(torch.device("cuda")):
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == benchmark  # extraction no longer leaves it on


def test_main_process_decoding_uses_the_free_cores_on_a_gpu(monkeypatch):
    from featcache.common import devices

    monkeypatch.setattr(devices, "usable_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cuda = torch.device("cuda")
    assert devices.main_process_decode_threads(cuda, 0, pre_decoded=True) == 8
    assert devices.main_process_decode_threads(cuda, 4, pre_decoded=False) == 1  # worker processes decode
    assert devices.main_process_decode_threads(torch.device("cpu"), 0, pre_decoded=True) == 1
    assert devices.main_process_decode_threads(torch.device("cpu"), 0, pre_decoded=False) == torch.get_num_threads()
