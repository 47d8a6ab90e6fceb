"""The compiled scan's own parts (prot_lib.models.numba_scan): its float32 exp, its disk cache and
its threads. Parity of the whole scan with the reference is in tests/test_scan.py."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prot_lib.models import numba_scan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _needs_numba():
    assert numba_scan.AVAILABLE, numba_scan.UNAVAILABLE_REASON  # a dependency: absent is a failure


def test_exp_matches_float64_exp_and_torch_on_every_edge():
    """Over [-120, 95] (every float32 regime: 0, subnormal, normal, inf) the kernels' exp is within
    2.5e-7 of float64's exp where the result is normal (torch's float32 exp: about 6e-8), and it
    is 0, subnormal, inf or NaN exactly where torch's exp is."""
    x = torch.cat([torch.linspace(-120, 95, 2_000_001),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -87.33655,
                                 -87.33654, -103.97, -103.972, -104.0, 88.72283, 88.72284, 1e30, -1e30])])
    ours, ref = numba_scan.exp_f32(x), torch.exp(x)
    exact = torch.exp(x.double())
    normal = torch.isfinite(ref) & (ref >= torch.finfo(torch.float32).tiny)
    rel = ((ours.double() - exact) / exact)[normal].abs().max().item()
    rel_torch = ((ref.double() - exact) / exact)[normal].abs().max().item()
    print(f"max relative error vs float64 exp where normal: ours {rel:.1e}, torch {rel_torch:.1e}")
    assert rel < 2.5e-7, rel
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours == float("inf"), ref == float("inf"))
    assert torch.equal(ours == 0, ref == 0)
    sub = (ref > 0) & (ref < torch.finfo(torch.float32).tiny)  # subnormal results, rounded once
    assert sub.sum() > 1000
    assert ((ours[sub] - ref[sub]).abs() <= ref[sub] * 2.5e-7 + 1.5e-45).all()
    with pytest.raises(TypeError, match="float32"):
        numba_scan.exp_f32(x.double())


CACHE_CHECK = """
import json, sys
from prot_lib.models import numba_scan
print(json.dumps(numba_scan.compile_kernels()))
"""


def _compile_report(env):
    done = subprocess.run([sys.executable, "-c", CACHE_CHECK], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_are_cached_on_disk_and_loaded_by_the_next_process(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    first = _compile_report(env)
    second = _compile_report(env)
    assert first["cache_misses"] == 2 and first["cache_hits"] == 0  # compiled, written to the cache
    assert second["cache_hits"] == 2 and second["cache_misses"] == 0  # loaded
    assert Path(first["cache_dir"]).is_relative_to(tmp_path) and any(tmp_path.rglob("*.nbi"))
    print(f"first call: {first['seconds']:.1f} s compiling, {second['seconds']:.2f} s from the cache")


def test_without_a_writable_cache_the_kernels_compile_per_process(tmp_path):
    """numba refuses cache=True where no cache location is writable; the kernels are then compiled
    without one instead of failing at import."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(blocked / "cache"),
           "NUMBA_CACHE_LOCATOR_CLASSES": "_UserProvidedCacheLocator"}
    report = _compile_report(env)
    assert report["cache_dir"] is None and report["cache_hits"] == 0  # compiled, not cached


def _scan_in_child(queue):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(4, 16, 20, generator=g), torch.rand(4, 16, 20, generator=g)
    A, B, C = -torch.rand(16, 4, generator=g), torch.randn(4, 4, 20, generator=g), torch.randn(4, 4, 20, generator=g)
    y, last = numba_scan.numba_scan(u, delta, A, B, C)
    queue.put(float(y.sum()))


def test_threads_work_in_a_forked_child():
    """The thread pool of a parent that used it is rebuilt in a forked child (whose copy has no
    threads), so the child's scan neither hangs nor differs."""
    torch.set_num_threads(2)
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        _scan_in_child(queue)  # the parent starts its pool
        parent = queue.get(timeout=60)
        child = ctx.Process(target=_scan_in_child, args=(queue,))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0, "the forked child's scan failed or hung"
        assert queue.get(timeout=10) == parent
    finally:
        torch.set_num_threads(1)
