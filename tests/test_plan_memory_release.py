"""fedkt.memory_release: freed heap pages go back to the OS at a run's phase boundaries (so ``fedkt plan``'s
"largest phase" is what the peak RSS measures, docs/gpu.md), and the hook is a no-op without glibc."""

import ctypes
import json
import os

import pytest

from fedkt import memory_release
from fedkt.experiment import run_experiment
from fedkt.registry import load_config


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.fixture()
def fresh(monkeypatch):
    """The module as if not yet looked up (``_trim`` is cached per process) and enabled."""
    monkeypatch.setattr(memory_release, "_trim", False)
    monkeypatch.setattr(memory_release, "enabled", True)


def test_noop_without_glibc(fresh, monkeypatch):
    monkeypatch.setattr(memory_release.sys, "platform", "darwin")
    before = memory_release.calls
    assert memory_release.available() is False
    assert memory_release.release() is False and memory_release.calls == before


def test_noop_when_libc_has_no_malloc_trim(fresh, monkeypatch):
    class Musl:  # a C library without the symbol: ctypes raises AttributeError on lookup
        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(memory_release.ctypes, "CDLL", lambda *a, **k: Musl())
    assert memory_release.available() is False and memory_release.release() is False


def test_a_failing_trim_never_raises(fresh, monkeypatch):
    def boom(pad):
        raise OSError("trim failed")

    monkeypatch.setattr(memory_release, "_trim", boom)
    assert memory_release.release() is False


def test_disabled_does_nothing(fresh, monkeypatch):
    monkeypatch.setattr(memory_release, "enabled", False)
    monkeypatch.setattr(memory_release, "_trim", lambda pad: pytest.fail("trimmed while disabled"))
    assert memory_release.release() is False


@pytest.mark.skipif(not memory_release.available(), reason="needs glibc's malloc_trim (Linux)")
def test_release_returns_freed_heap_pages_to_the_os(fresh):
    """The glibc behaviour the hook exists for: after a large block is freed the mmap threshold rises, later
    blocks of that size live in the heap, and freeing them below a live block keeps their pages resident until
    ``malloc_trim``."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        pytest.skip("a fixed mmap/trim threshold returns freed blocks by itself")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    mb = 1 << 20
    big = libc.malloc(16 * mb)  # mmapped (above the initial 128 KiB threshold); its free raises the threshold
    ctypes.memset(big, 1, 16 * mb)
    libc.free(big)
    blocks = [libc.malloc(4 * mb) for _ in range(40)]  # now from the heap
    fence = libc.malloc(4 * mb)  # live above them: the freed blocks are not the heap's top
    for b in blocks:
        ctypes.memset(b, 1, 4 * mb)
    touched = rss()
    for b in blocks:
        libc.free(b)
    held = rss()
    try:
        assert touched - held < 40 * mb, "the freed blocks went back by themselves: nothing to test here"
        assert memory_release.release() is True
        assert held - rss() > 120 * mb  # 160 MB freed; the pages of all of it but the edges are returned
    finally:
        libc.free(fence)


def test_in_process_run_releases_at_every_phase_boundary(tmp_path, model_dirs, data_dir, monkeypatch):
    """One FedCoLLM round on 3 clients: a release after each client's handler, after the server's
    distillation (the round), after the evaluation of both roles, and after the method."""
    import fedkt.algorithms.fedcollm as fedcollm
    import fedkt.federation.local as local
    from fedkt.server import ServerContext

    trace: list[str] = []
    check, distill, evaluate = local.check_request, fedcollm.mutual_distill, ServerContext.evaluate_questions

    def client(method, request):
        trace.append(f"client:{method}")
        return check(method, request)

    def server_distill(*a, **k):
        trace.append("distill")
        return distill(*a, **k)

    def server_eval(self, role, *a, **k):
        trace.append(f"eval:{role}")
        return evaluate(self, role, *a, **k)

    monkeypatch.setattr(local, "check_request", client)
    monkeypatch.setattr(fedcollm, "mutual_distill", server_distill)
    monkeypatch.setattr(ServerContext, "evaluate_questions", server_eval)
    monkeypatch.setattr(memory_release, "release", lambda: trace.append("release") or True)
    sets = [f'model.slm="{model_dirs["slm"]}"', f'model.llm="{model_dirs["llm"]}"', f'data.dir="{data_dir}"',
            f"methods={json.dumps(['fedcollm'])}", "partition.num_clients=3", "partition.aux_size=8",
            "federation.rounds=1", "train.batch_size=4", "eval.batch_size=16", "lora.r=4",
            'lora.target_modules=["q_proj","v_proj"]', "fedcollm.kd_steps=2", "fedcollm.batch_size=4"]
    run_experiment(load_config(None, sets), tmp_path / "r")
    fit = next(t for t in trace if t.startswith("client:"))
    assert trace == [fit, "release"] * 3 + ["distill", "release", "eval:slm", "eval:llm", "release", "release"]
