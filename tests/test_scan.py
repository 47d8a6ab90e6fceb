"""The fast selective scans, compiled (prot_lib.models.numba_scan) and pure PyTorch
(prot_lib.models.chunked_scan): parity, edge cases, NaN honesty, memory, the default path and its
fallback.

Every test that compares with the reference runs both (``FAST``). Tolerances: both form the same
elementwise products as mamba-ssm's selective_scan_ref but sum them in another order and fuse
multiply-adds, so they match to float32 round-off: rtol = 1e-5 and atol = 1e-5 * max|reference| per
tensor (the error of a reordered sum is relative to its largest terms; see tests/test_models.py).
Measured worst max|error| / max|reference| over the golden cases and the chunk sizes tried: about
4e-7 (printed by ``pytest -s tests/test_scan.py -k golden``).

No test here asserts a time; benchmarks/bench_scan.py reports them.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prot_lib.models import numba_scan
from prot_lib.models.chunked_scan import default_chunk_size

ss = importlib.import_module("prot_lib.models.selective_scan")  # the module, not the function
selective_scan_chunked = ss.selective_scan_chunked
selective_scan_numba = ss.selective_scan_numba
selective_scan_reference = ss.selective_scan_reference

ROOT = Path(__file__).resolve().parents[1]
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
RTOL, ATOL_SCALED = 1e-5, 1e-5
# the two fast scans; numba is a dependency of the project, so its absence is a failure here (the
# fallback without it is tested in a subprocess below)
FAST = {"numba": selective_scan_numba, "chunked": selective_scan_chunked}
fast_scans = pytest.mark.parametrize("impl", list(FAST))


@functools.lru_cache(maxsize=1)
def _golden(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def make_inputs(batch=2, d_inner=8, d_state=4, L=37, seed=0, D=True, z=True, delta_bias=True):
    """Random scan inputs: u, delta, B, C, z ~ N(0, 1); A < 0; small positive delta_bias."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "u": torch.randn(batch, d_inner, L, generator=g),
        "delta": torch.randn(batch, d_inner, L, generator=g) * 0.5,
        "A": -torch.exp(torch.randn(d_inner, d_state, generator=g) * 0.5),
        "B": torch.randn(batch, d_state, L, generator=g),
        "C": torch.randn(batch, d_state, L, generator=g),
        "D": torch.randn(d_inner, generator=g) if D else None,
        "z": torch.randn(batch, d_inner, L, generator=g) if z else None,
        "delta_bias": torch.rand(d_inner, generator=g) * 0.2 if delta_bias else None,
    }
    return inputs


def run(fn, inputs, delta_softplus=True, use_last_state=False, seed=1, **kw):
    """out, last_state and the gradients of sum(out * g) [+ sum(last_state * g2)] for every input
    (``use_last_state="only"``: of sum(last_state * g2) alone)."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None)
              for k, v in inputs.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
                   z=leaves["z"], delta_bias=leaves["delta_bias"], delta_softplus=delta_softplus,
                   return_last_state=True, **kw)
    g = torch.Generator().manual_seed(seed)
    loss = (out.float() * torch.randn(out.shape, generator=g)).sum()
    if use_last_state == "only":
        loss = (last * torch.randn(last.shape, generator=g)).sum()
    elif use_last_state:
        loss = loss + (last * torch.randn(last.shape, generator=g)).sum()
    names = [k for k in ARGS if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    res = {"out": out, "last_state": last}
    res.update({f"grad_{k}": torch.zeros_like(leaves[k]) if gr is None else gr  # unused: zero
                for k, gr in zip(names, grads)})
    return res


def assert_close_scaled(actual, expected, what):
    atol = max(1e-30, ATOL_SCALED * expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol,
                               msg=lambda m: f"{what} (atol {atol:.2g}): {m}")


def assert_bit_identical(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for k in expected:
        assert torch.equal(actual[k], expected[k]), k


def assert_same_results(actual: dict, expected: dict, what: str):
    assert actual.keys() == expected.keys()
    for k in expected:
        assert actual[k].dtype == expected[k].dtype, f"{what} {k}: dtype"
        assert_close_scaled(actual[k], expected[k], f"{what} {k}")


# --------------------------------------------------------------------------- wiring

def test_numba_is_importable_and_the_default_cpu_path(monkeypatch):
    assert numba_scan.AVAILABLE, numba_scan.UNAVAILABLE_REASON
    monkeypatch.delenv(ss.SCAN_ENV, raising=False)
    assert ss.scan_backend() == "numba"
    assert ss.scan_backend("meta") == "torch"  # other devices: the pure-PyTorch scan
    monkeypatch.setenv(ss.SCAN_ENV, "torch")
    assert ss.scan_backend() == "torch"
    monkeypatch.setenv(ss.SCAN_ENV, "NUMBA")
    assert ss.scan_backend() == "numba"
    monkeypatch.setenv(ss.SCAN_ENV, "fast")
    with pytest.raises(ValueError, match="PROT_LIB_SCAN"):
        ss.scan_backend()


@pytest.mark.parametrize("env, used", [("auto", "numba"), ("torch", "chunked")])
def test_selective_scan_runs_the_backend_it_names(monkeypatch, env, used):
    """selective_scan's result is bit-identical to the implementation scan_backend names."""
    monkeypatch.setenv(ss.SCAN_ENV, env)
    x = make_inputs(L=40)
    assert_bit_identical(run(ss.selective_scan, x), run(FAST[used], x))


def test_no_import_cycle_between_the_scan_modules():
    """selective_scan imports chunked_scan and numba_scan; they import nothing of it (issue 10)."""
    for name in ("chunked_scan", "numba_scan"):
        text = (ROOT / "prot_lib" / "models" / f"{name}.py").read_text()
        assert "selective_scan import" not in text and "from . import" not in text, name


FALLBACK_CHECK = """
import sys
sys.modules["numba"] = None  # numba cannot be imported: ImportError on `import numba`
import importlib, torch
ss = importlib.import_module("prot_lib.models.selective_scan")
from prot_lib.models import Mamba, numba_scan
assert not numba_scan.AVAILABLE and "numba" in numba_scan.UNAVAILABLE_REASON, numba_scan.UNAVAILABLE_REASON
assert ss.scan_backend() == "torch"
golden = torch.load(sys.argv[1], weights_only=True)
worst = 0.0
for case in golden["selective_scan_ref_cases"]:
    names = list(case["grads"])
    leaves = {k: case[k].clone().requires_grad_(True) for k in names}
    out, last = ss.selective_scan(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                                  leaves["D"], z=leaves.get("z"), delta_bias=leaves.get("delta_bias"),
                                  delta_softplus=case["delta_softplus"], return_last_state=True)
    grads = torch.autograd.grad((out * case["grad_out"]).sum(), [leaves[k] for k in names])
    pairs = [(out, case["out"]), (last, case["last_state"])] + [(g, case["grads"][k]) for k, g in zip(names, grads)]
    for a, e in pairs:
        worst = max(worst, float((a - e).abs().max() / e.abs().max()))
block = Mamba(d_model=8, backend="torch")
block(torch.randn(2, 5, 8)).sum().backward()  # the model runs on the fallback too
try:
    ss.selective_scan_numba(*(case[k] for k in ("u", "delta", "A", "B", "C")))
except RuntimeError as err:
    assert "numba" in str(err)
else:
    raise AssertionError("selective_scan_numba ran without numba")
print(f"worst {worst:.3e}")
assert worst < 1e-5, worst
"""


def test_fallback_without_numba_passes_golden_parity(golden_path):
    """In a process where `import numba` fails, the default path is the chunked scan, it matches
    mamba-ssm's golden outputs, and the compiled scan says why it cannot run."""
    if not golden_path.is_file():
        pytest.fail(f"golden file {golden_path} is missing (set PROT_LIB_GOLDEN)")
    env = {k: v for k, v in os.environ.items() if k != ss.SCAN_ENV}
    done = subprocess.run([sys.executable, "-c", FALLBACK_CHECK, str(golden_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "worst" in done.stdout
    assert "numba cannot be imported" in done.stderr  # the fallback is logged, not silent


def test_forcing_numba_without_it_is_an_error():
    code = ("import sys; sys.modules['numba'] = None; import importlib, torch; "
            "ss = importlib.import_module('prot_lib.models.selective_scan'); "
            "x = torch.randn(1, 2, 3); B = torch.randn(1, 2, 3); "
            "ss.selective_scan(x, x, -torch.ones(2, 2), B, B)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, ss.SCAN_ENV: "numba"})
    assert done.returncode != 0 and "PROT_LIB_SCAN=numba, but numba cannot be imported" in done.stderr


def test_default_chunk_size():
    assert default_chunk_size(16, 64, 16) == 16  # 2**18 floats per chunk buffer
    assert default_chunk_size(16, 256, 16) == 8  # lower bound
    assert default_chunk_size(1, 4, 4) == 64  # upper bound


def test_channel_blocks_cover_the_threads():
    assert numba_scan.channel_block(16, 64, threads=2) == 64  # the batch alone feeds 2 threads
    assert numba_scan.channel_block(50, 200, threads=1) == 200  # one block up to 256 channels
    assert numba_scan.channel_block(1, 512, threads=1) == 256  # two blocks of 256
    assert numba_scan.channel_block(1, 64, threads=2) == 32  # batch 1: two blocks for two threads
    assert numba_scan.channel_block(1, 8, threads=2) == 8  # never below one 8-lane vector


@fast_scans
def test_bad_arguments_raise(impl):
    x = make_inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        FAST[impl](x["u"], x["delta"], x["A"], x["B"], x["C"], chunk_size=0)
    with pytest.raises(ValueError, match="delta"):
        FAST[impl](x["u"], x["delta"][..., :-1], x["A"], x["B"], x["C"])


# --------------------------------------------------------------------------- golden parity

@fast_scans
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_matches_mamba_ssm_golden_cases(golden_path, impl, chunk_size):
    if not golden_path.is_file():
        pytest.fail(f"golden file {golden_path} is missing (set PROT_LIB_GOLDEN)")
    worst = {}
    for i, case in enumerate(_golden(golden_path)["selective_scan_ref_cases"]):
        names = list(case["grads"])
        leaves = {k: case[k].clone().requires_grad_(True) for k in names}
        out, last = FAST[impl](
            leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"],
            z=leaves.get("z"), delta_bias=leaves.get("delta_bias"),
            delta_softplus=case["delta_softplus"], return_last_state=True, chunk_size=chunk_size)
        assert_close_scaled(out, case["out"], f"case {i} out")
        assert_close_scaled(last, case["last_state"], f"case {i} last_state")
        grads = torch.autograd.grad((out * case["grad_out"]).sum(), [leaves[k] for k in names])
        for name, grad in zip(names, grads):
            assert_close_scaled(grad, case["grads"][name], f"case {i} grad {name}")
        pairs = [(out, case["out"]), (last, case["last_state"])] + [
            (g, case["grads"][k]) for k, g in zip(names, grads)]
        worst[i] = max(float((a.detach() - e).abs().max() / e.abs().max()) for a, e in pairs)
    print(f"{impl} chunk_size={chunk_size}: worst max|err|/max|ref| per golden case:",
          {i: f"{w:.1e}" for i, w in worst.items()})


# --------------------------------------------------------------------------- edge cases

EDGE_CASES = {
    "L=1": dict(L=1),
    "L=37 chunk 16": dict(L=37, chunk_size=16),
    "L=37 chunk 1": dict(L=37, chunk_size=1),
    "L=37 chunk > L": dict(L=37, chunk_size=64),
    "no softplus": dict(delta_softplus=False),
    "no z": dict(z=False),
    "no delta_bias": dict(delta_bias=False),
    "no z, D or delta_bias": dict(z=False, D=False, delta_bias=False),
    "batch 1": dict(batch=1, L=20, chunk_size=8),
    "grad through last state": dict(use_last_state=True, chunk_size=16),
    "grad of last state only": dict(use_last_state="only", chunk_size=16),
    "d_state 16, L 100": dict(d_state=16, L=100, use_last_state=True),
    # channel counts that are no multiple of 8 (one AVX2 vector) and several channel blocks
    "d_inner 13, d_state 3": dict(d_inner=13, d_state=3, L=29, chunk_size=7),
    "d_inner 600 (3 blocks of 200)": dict(d_inner=600, batch=1, L=33, use_last_state=True),
}


@fast_scans
@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_matches_reference_on_edge_cases(impl, case):
    opts = dict(EDGE_CASES[case])
    run_kw = {k: opts.pop(k) for k in ("delta_softplus", "use_last_state") if k in opts}
    chunk = {"chunk_size": opts.pop("chunk_size")} if "chunk_size" in opts else {}
    inputs = make_inputs(**opts)
    expected = run(selective_scan_reference, inputs, **run_kw)
    actual = run(FAST[impl], inputs, **run_kw, **chunk)
    assert_same_results(actual, expected, case)


def test_numba_scan_is_the_same_on_one_thread_and_two():
    """Threads split the batch; each element's arithmetic is the same, so the results are
    bit-identical. With batch 1 the channels are split instead: still the reference's values."""
    x = make_inputs(batch=4, d_inner=24, d_state=16, L=50)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(selective_scan_numba, x, use_last_state=True)
        torch.set_num_threads(2)
        two = run(selective_scan_numba, x, use_last_state=True)
        x1 = make_inputs(batch=1, d_inner=40, d_state=16, L=50)
        split = run(selective_scan_numba, x1, use_last_state=True)
    finally:
        torch.set_num_threads(before)
    assert_bit_identical(two, one)
    assert_same_results(split, run(selective_scan_reference, x1, use_last_state=True), "batch 1, 2 threads")


@fast_scans
def test_mamba_layouts_give_the_same_results(impl):
    """Inside Mamba, delta and z are transposed views of (batch, L, d_inner) tensors (z with a row
    stride of 2 * d_inner, as a half of in_proj's output); the results do not depend on strides."""
    x = make_inputs(batch=3, d_inner=24, d_state=16, L=30)
    strided = dict(x)
    strided["delta"] = x["delta"].transpose(1, 2).contiguous().transpose(1, 2)
    both = torch.cat([x["z"], x["u"]], dim=1).transpose(1, 2).contiguous().transpose(1, 2)
    strided["z"] = both[:, :24]  # (batch, d_inner, L) view with strides (L * 48, 1, 48)
    assert not strided["z"].is_contiguous() and not strided["delta"].is_contiguous()
    assert_same_results(run(FAST[impl], strided), run(FAST[impl], x), "strided inputs")


@fast_scans
def test_time_invariant_B_C_fall_back_to_the_loop(impl):
    x = make_inputs(d_inner=6, d_state=3, L=9)
    g = torch.Generator().manual_seed(3)
    x["B"], x["C"] = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    assert_same_results(run(FAST[impl], x), run(selective_scan_reference, x), "2-D B, C")


@fast_scans
def test_no_grad_inference_and_inputs_without_grad(impl):
    fn = FAST[impl]
    x = make_inputs(L=40)
    args = [x[k] for k in ("u", "delta", "A", "B", "C", "D")]
    kw = dict(z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        out, last = fn(*args, **kw, chunk_size=16)
    assert out.grad_fn is None and last.grad_fn is None
    out2, last2 = fn(*args, **kw, chunk_size=16)  # nothing requires grad
    assert out2.grad_fn is None
    assert torch.equal(out, out2) and torch.equal(last, last2)  # the same forward code
    ref_out, ref_last = selective_scan_reference(*args, **kw)
    assert_close_scaled(out, ref_out, "no-grad out")
    assert_close_scaled(last, ref_last, "no-grad last_state")
    # only u requires grad: the other inputs' gradients are not asked for
    u = x["u"].clone().requires_grad_(True)
    (gu,) = torch.autograd.grad(fn(u, *args[1:], **kw)[0].sum(), [u])
    (gu_ref,) = torch.autograd.grad(selective_scan_reference(u, *args[1:], **kw)[0].sum(), [u])
    assert_close_scaled(gu, gu_ref, "grad u alone")


@fast_scans
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_input_dtype_handling_like_the_reference(impl, dtype):
    x = {k: (v.to(dtype) if v is not None else None) for k, v in make_inputs(L=20).items()}
    expected = run(selective_scan_reference, x)
    actual = run(FAST[impl], x, chunk_size=8)
    assert actual["out"].dtype == dtype and actual["last_state"].dtype == torch.float32
    assert_same_results(actual, expected, str(dtype))


# --------------------------------------------------------------------------- NaN honesty

def hostile_inputs(seed=0):
    """The issue's hostile regime: |u| ~ 1e4, delta ~ 20 after softplus, A ~ -16 (exp underflows)."""
    x = make_inputs(batch=3, d_inner=8, d_state=16, L=37, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x["u"] = torch.randn(x["u"].shape, generator=g) * 1e4
    x["delta"] = 20 + torch.randn(x["delta"].shape, generator=g)
    x["A"] = -16 * (1 + torch.rand(x["A"].shape, generator=g))
    x["z"] = x["z"] * 4
    return x


def assert_same_nonfinite(actual: dict, expected: dict, what: str, kinds: bool = True):
    """Same isfinite mask, close values where finite and, with ``kinds``, the same NaN / +inf / -inf
    at the non-finite places."""
    for k, e in expected.items():
        a = actual[k]
        assert torch.equal(torch.isfinite(a), torch.isfinite(e)), f"{what} {k}: isfinite masks differ"
        bad = ~torch.isfinite(e)
        if kinds:
            torch.testing.assert_close(a[bad], e[bad], equal_nan=True, rtol=0, atol=0,
                                       msg=lambda m: f"{what} {k} non-finite values: {m}")
        if (~bad).any():
            assert_close_scaled(a[~bad], e[~bad], f"{what} {k} finite part")


@fast_scans
def test_hostile_inputs_stay_finite_where_the_reference_is(impl):
    x = hostile_inputs()
    expected = run(selective_scan_reference, x)
    assert all(torch.isfinite(v).all() for v in expected.values())  # the premise
    actual = run(FAST[impl], x, chunk_size=8)
    for k, v in actual.items():
        assert torch.isfinite(v).all(), f"{k}: non-finite where the reference is finite"
    assert_same_results(actual, expected, "hostile")


ALL = tuple(FAST)
OVERFLOWS = {
    # (input, index, scale): the implementations whose NaN / +inf / -inf match the reference's
    # element for element; the others match its isfinite mask (see the edge below)
    "u burst in one channel": (("u", (0, 2, slice(10, 12)), 1e35), ALL),
    "u at one step, all channels": (("u", (2, slice(None), 3), 1e36), ALL),
    "delta burst": (("delta", (0, 3, slice(7, 9)), 1e36), ALL),
    "C at one step": (("C", (2, 3, 20), 1e36), ALL),
    "NaN in u": (("u", (0, 5, 12), float("nan")), ALL),
    "inf in delta": (("delta", (1, 6, 4), float("inf")), ALL),
    # Edge: the terms of a sum are one inf and finite values near +-2e38, so partial sums overflow
    # in one summation order and not in another. Here grad u = sum_n G (Delta B) at the gated
    # step: the reference (and torch.sum in the chunked scan) gets NaN (-inf + inf) at some
    # elements, the numba kernels' sequential sum over n gets inf. The isfinite masks agree; a
    # reordered float32 sum cannot promise more (terms printed by scripts are in the test's failure).
    "z gate": (("z", (1, slice(0, 4), 30), 1e37), ("chunked",)),
    # the same edge in grad delta for both: Delta B u = inf at one step, terms (G u) B ~ 1e38
    "B at one step (edge)": (("B", (1, slice(None), 5), 1e36), ()),
}


@fast_scans
@pytest.mark.parametrize("case", list(OVERFLOWS), ids=list(OVERFLOWS))
def test_overflow_is_reported_as_the_reference_reports_it(impl, case):
    (name, index, scale), kinds_match = OVERFLOWS[case]
    x = hostile_inputs()
    x[name][index] *= scale
    expected = run(selective_scan_reference, x)
    assert not all(torch.isfinite(v).all() for v in expected.values())  # the premise
    actual = run(FAST[impl], x, chunk_size=8)
    assert_same_nonfinite(actual, expected, f"overflow via {case}", kinds=impl in kinds_match)


@fast_scans
def test_mamba_mini_6_replay(impl):
    """MzeroMiko/mamba-mini#6: with mamba's default A = -(1..16) and delta ~ 0.1, the cumulative
    sum of delta * A passes -88 within 64 steps; a closed form dividing by exp(cumsum) gives
    0 * inf = NaN. The streamed scan only multiplies by decays in (0, 1] and stays finite."""
    x = make_inputs(batch=2, d_inner=4, d_state=16, L=64, seed=6)
    x["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(4, 1)
    x["delta"] = torch.full_like(x["delta"], 0.1) + 0.01 * torch.rand(x["delta"].shape)
    x["delta_bias"] = None
    # the hazard is real on these inputs: the log-space / divide-by-cumprod closed form breaks
    dA = torch.einsum("bdl,dn->bdln", x["delta"], x["A"]).cumsum(2)
    dBu = torch.einsum("bdl,bnl,bdl->bdln", x["delta"], x["B"], x["u"])
    closed = torch.exp(dA) * torch.cumsum(dBu / torch.exp(dA), dim=2)
    assert dA.min() < -88 and not torch.isfinite(closed).all()
    expected = run(selective_scan_reference, x, delta_softplus=False)
    actual = run(FAST[impl], x, delta_softplus=False)
    for k, v in actual.items():
        assert torch.isfinite(v).all(), k
    assert_same_results(actual, expected, "mamba-mini#6")


# --------------------------------------------------------------------------- memory

@fast_scans
def test_saves_no_full_size_state_tensor(impl):
    batch, d_inner, d_state, L, T = 2, 16, 16, 256, 8
    x = make_inputs(batch=batch, d_inner=d_inner, d_state=d_state, L=L)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = FAST[impl](*(leaves[k] for k in ARGS[:6]), z=leaves["z"],
                         delta_bias=leaves["delta_bias"], delta_softplus=True, chunk_size=T)
    full = batch * d_inner * d_state * L
    assert max(saved) == full // T  # the chunk-entry states: the largest thing kept
    assert sum(saved) < full  # all saved tensors together: less than one (batch, d_inner, d_state, L)
    out.sum().backward()  # and the backward runs from what was saved


# --------------------------------------------------------------------------- benchmark script

def test_benchmark_quick_mode_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        bench = importlib.import_module("bench_scan")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "bench.json"
    result = bench.main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["cells"] == json.loads(json.dumps(result["cells"])) and saved["meta"]["complete"]
    assert saved["compile"]["this_process"]["cache_hits"] + saved["compile"]["this_process"]["cache_misses"] == 2
    cells = result["cells"]
    assert {c["mode"] for c in cells} == {"fwd", "fwd+bwd"}
    for c in cells:
        assert {"ours", "chunked", "unbind", "pscan"} <= set(c["time_s"]), c["time_s"]
        assert c["peak_mem_bytes"]["ours"] > 0 and c["floor_s"] > 0
        assert all(r > 0 for r in c["ratios"].values())
        assert c["over_floor"]["ours"] == pytest.approx(c["time_s"]["ours"] / c["floor_s"])
        if c["mode"] == "fwd+bwd":  # every scan's out, last state and gradients vs the reference loop
            assert set(c["errors"]) == {"against", "ours", "chunked", "pscan"}
            for name, err in c["errors"].items():
                if name != "against":
                    assert err["max_rel"] < 1e-5, (name, err)
    step = result["model_step"][0]
    assert {"ours", "chunked", "no-scan", "chunked-pre13"} <= set(step["time_s"]) and step["scan_floor_s"] > 0
    t = step["time_s"]  # the bound: what any exact scan could give, from no-scan and the scans' floor
    assert step["bound"]["chunked-pre13/(no-scan + scan floor)"] == pytest.approx(
        t["chunked-pre13"] / (t["no-scan"] + step["scan_floor_s"]))
