"""The kernels' buffer pool: memory is reused only when nothing else can read it, and the scan and
the convolution give the same bits with and without it."""
import gc

import pytest
import torch

from prot_lib.models import buffer_pool, numba_scan
from prot_lib.models.mamba import Mamba

BIG = (4, 512, 256)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    monkeypatch.setenv("PROT_LIB_BUFFER_POOL_MB", "256")
    gc.collect()
    buffer_pool.clear()
    yield
    gc.collect()
    buffer_pool.clear()


def test_a_free_base_is_counted_as_free_and_a_held_view_keeps_it_busy():
    t = buffer_pool.empty(BIG)
    base_ptr = t.data_ptr()
    assert buffer_pool.stats()["free_bases"] == 0
    u = buffer_pool.empty(BIG)  # t is alive: a new base
    assert u.data_ptr() != base_ptr
    kept = t.transpose(1, 2)  # a view of t keeps its base busy after t is gone
    del t
    v = buffer_pool.empty(BIG)
    assert v.data_ptr() not in (base_ptr, u.data_ptr())
    del kept
    w = buffer_pool.empty(BIG)
    assert w.data_ptr() == base_ptr  # now reused
    assert buffer_pool.stats()["reused"] >= 1


def test_small_tensors_and_a_zero_limit_are_not_pooled(monkeypatch):
    before = buffer_pool.stats()["new"]
    small = buffer_pool.empty((10, 10))
    assert small.shape == (10, 10) and buffer_pool.stats()["new"] == before
    monkeypatch.setenv("PROT_LIB_BUFFER_POOL_MB", "0")
    assert not buffer_pool.enabled()
    big = buffer_pool.empty(BIG)
    assert big.shape == BIG and buffer_pool.stats()["new"] == before


def test_the_limit_is_kept_and_beyond_it_tensors_are_plain(monkeypatch):
    monkeypatch.setenv("PROT_LIB_BUFFER_POOL_MB", "5")  # room for two 2 MiB bases, not three
    held = [buffer_pool.empty(BIG) for _ in range(3)]
    s = buffer_pool.stats()
    assert s["bases"] == 2 and s["held_bytes"] == 2 * 4 * 512 * 256 * 4 and s["unpooled"] >= 1
    assert len({t.data_ptr() for t in held}) == 3


def test_a_bad_limit_names_the_variable(monkeypatch):
    monkeypatch.setenv("PROT_LIB_BUFFER_POOL_MB", "lots")
    with pytest.raises(ValueError, match="PROT_LIB_BUFFER_POOL_MB"):
        buffer_pool.empty(BIG)


def test_clear_gives_back_free_bases_only():
    held = buffer_pool.empty(BIG)
    freed_later = buffer_pool.empty(BIG)
    del freed_later
    assert buffer_pool.clear() == 4 * 512 * 256 * 4
    assert buffer_pool.stats()["bases"] == 1
    del held


def test_without_use_counts_the_pool_is_off(monkeypatch):
    monkeypatch.setattr(buffer_pool, "_USE_COUNT", None)
    assert not buffer_pool.enabled()
    before = buffer_pool.stats()["new"]
    assert buffer_pool.empty(BIG).shape == BIG and buffer_pool.stats()["new"] == before


def _block_grads(seed: int):
    torch.manual_seed(seed)
    block = Mamba(d_model=64, d_state=8)  # d_inner 128: the scan's (2, 1024, 128) tensors are 1 MiB
    x = torch.randn(2, 1024, 64, requires_grad=True)
    out = block(x)
    out.square().mean().backward()
    return [out.detach()] + [p.grad for p in [x, *block.parameters()]]


@pytest.mark.skipif(not numba_scan.AVAILABLE, reason="the pool serves the numba kernels")
def test_a_mamba_block_gives_the_same_bits_with_and_without_the_pool(monkeypatch):
    pooled_first = _block_grads(0)
    pooled_again = _block_grads(0)  # now from reused bases, with the first call's stale contents
    assert buffer_pool.stats()["reused"] > 0
    monkeypatch.setenv("PROT_LIB_BUFFER_POOL_MB", "0")
    plain = _block_grads(0)
    for a, b, c in zip(pooled_first, pooled_again, plain):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.skipif(not numba_scan.AVAILABLE, reason="the pool serves the numba kernels")
def test_a_retained_graph_keeps_its_saved_tensors_through_other_calls():
    torch.manual_seed(1)
    block = Mamba(d_model=64, d_state=8)
    x = torch.randn(2, 1024, 64, requires_grad=True)
    loss = block(x).square().mean()
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    for _ in range(2):  # other forward/backward passes that ask the pool for the same sizes
        block(torch.randn(2, 1024, 64)).sum().backward()
    x.grad = None
    loss.backward()  # the retained graph's saved tensors must be as they were
    assert torch.equal(x.grad, first)


@pytest.mark.skipif(not numba_scan.AVAILABLE, reason="the pool serves the numba kernels")
def test_an_output_the_caller_keeps_is_never_written_by_a_later_call():
    torch.manual_seed(2)
    block = Mamba(d_model=64, d_state=8)
    with torch.no_grad():
        y = torch.randn(2, 1024, 128)  # the scan's output is pooled; keep the block's conv output
        conv_out = block.conv1d(y)
        snapshot = conv_out.clone()
        for _ in range(3):
            block.conv1d(torch.randn(2, 1024, 128))
    assert torch.equal(conv_out, snapshot)


def test_run_kfold_gives_the_pools_free_memory_back(tmp_path, monkeypatch):
    from prot_lib.training import reproduction_config, run_kfold

    monkeypatch.setenv("PROT_LIB_CACHE", str(tmp_path / "cache"))
    leftover = buffer_pool.empty(BIG)  # memory an earlier, bigger model left in the pool
    del leftover
    assert buffer_pool.stats()["free_bases"] == 1
    run_kfold(reproduction_config("ishigami"), folds=[0], max_steps=2, progress=False, run_dir=tmp_path / "r")
    assert buffer_pool.stats()["bases"] == 0 and buffer_pool.stats()["held_bytes"] == 0
