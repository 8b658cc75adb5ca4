"""The CPU kernel's own code paths (issue #12), against the float64 reference:

- 16-bit sub-counters (four per raw id, each taking every fourth value) folded into 32-bit ones
  before any can pass 65535: constant tensors put every value on one id, past 4 * 65535 values;
- zeros and negatives read from the raw-id table, with the subnormals that share the zeros' raw
  id (fp32 bits of |x| below 2^(23 - k), i.e. 0 < |x| < 2^(-149 + 23 - k)) counted apart in the
  blocks that hold them;
- blocks with NaN/Inf found by their non-finite block sum (+Inf and -Inf together sum to NaN);
- every version this CPU runs (AVX-512, AVX2, the baseline; ``DNNTRACE_CPU_ISA`` caps the choice,
  in a subprocess each): every integer field bit-identical to the reference and to each other.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _strategies import bit_arrays, exact_f64, layouts
from _support import assert_counts_equal, assert_moments_close, fresh_state
from hypothesis import given, settings
from hypothesis import strategies as st

from dnntrace import _C, ops
from dnntrace.storage.layout import Layout
from reference import CALLS, MAX, MIN, SUM, SUM_COMP, SUMSQ, SUMSQ_COMP, tensor_summary_ref

LOW = (torch.float32, torch.bfloat16, torch.float16)
SUB_RANGE = 4 * 65535  # four 16-bit sub-counters per id hold at most this many values
SIZES = [SUB_RANGE + 1, (1 << 20) + 3]


def _tiny(dtype: torch.dtype) -> float:
    """The smallest positive subnormal of dtype: it shares the raw id of +0 for every k."""
    return {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}[dtype]


def _values(dtype: torch.dtype) -> list[float]:
    return [1.5, -2.75, 0.0, -0.0, _tiny(dtype), -_tiny(dtype)]


@functools.lru_cache(maxsize=64)
def _constant_ref(dtype: torch.dtype, value: float, n: int, k: int):
    x = torch.full((1,), value, dtype=dtype)
    c, m = tensor_summary_ref(exact_f64(x), k, -126, 254)
    c = c * n  # the one value's bucket and header fields (count, zeros or negatives), n times
    c[CALLS] = 1
    fin = float(exact_f64(x)[0])
    m = m.copy()
    m[SUM] = math.fsum([fin] * n)
    m[SUMSQ] = math.fsum([fin * fin] * n)
    return c, m


def _summarize(x: torch.Tensor, k: int, emin: int, octaves: int, histogram: bool = True):
    counts, moments = fresh_state(1, k, emin, octaves)
    ops.tensor_summary_out(x, 0, counts, moments, Layout(k, emin, octaves), histogram=histogram)
    return counts[0].numpy(), moments[0].numpy()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_constant_tensors_past_the_sub_counter_range(dtype, n, threads):
    """Every value on one raw id: the sub-counters of that id are folded before they wrap, on
    one thread (one table takes it all) and on two. For ±0 the counts come from the zeros' ids,
    for the smallest subnormals from the correction of the blocks that hold them."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for value in _values(dtype):
            for k in (0, 6, 7):
                x = torch.full((n,), value, dtype=dtype)
                want_c, want_m = _constant_ref(dtype, value, n, k)
                for histogram in (True, False):
                    got_c, got_m = _summarize(x, k, -126, 254, histogram)
                    assert_counts_equal(got_c, want_c, histogram=histogram)
                    assert got_m[MIN] == want_m[MIN] and got_m[MAX] == want_m[MAX]
                    s, ss = got_m[SUM] + got_m[SUM_COMP], got_m[SUMSQ] + got_m[SUMSQ_COMP]
                    assert abs(s - want_m[SUM]) <= 1e-12 * abs(want_m[SUM]), (value, k, s)
                    assert abs(ss - want_m[SUMSQ]) <= 1e-12 * want_m[SUMSQ], (value, k, ss)
    finally:
        torch.set_num_threads(old)


@settings(max_examples=15)
@given(data=st.data(), layout=layouts(), histogram=st.booleans())
def test_few_patterns_repeated_past_the_sub_counter_range(data, layout, histogram):
    """One to three drawn bit patterns (±0, subnormals, NaN payloads, ±Inf, window edges, ...)
    repeated past 4 * 65535 values, so each pattern's id takes more than a sub-counter holds."""
    k, emin, octaves = layout
    dtype = data.draw(st.sampled_from(LOW))
    base = data.draw(bit_arrays(dtype, (data.draw(st.integers(1, 3)),), emin, octaves))
    n = data.draw(st.sampled_from([SUB_RANGE + 1, 3 * SUB_RANGE + 17]))
    x = base.repeat(-(-n // base.numel()))[:n]
    values = exact_f64(x)
    want_c, want_m = tensor_summary_ref(values, k, emin, octaves)
    got_c, got_m = _summarize(x, k, emin, octaves, histogram)
    assert_counts_equal(got_c, want_c, histogram=histogram)
    assert_moments_close(got_m, want_m, values)


def _zero_id_mix(dtype: torch.dtype, n: int) -> torch.Tensor:
    """±0 and the subnormals that share their raw ids, in some blocks only, next to ordinary
    values, ±Inf (whose sum is NaN when both are in a block) and NaN."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    tiny = _tiny(dtype)
    pattern = torch.tensor([0.0, tiny, -0.0, -tiny, 2 * tiny, -3 * tiny], dtype=torch.float64)
    x[1024 : 1024 + 600] = pattern.repeat(100).to(dtype)  # block 1: zeros and subnormals
    x[5 * 1024 + 7] = math.inf  # block 5: +Inf and -Inf, finite sum would be NaN
    x[5 * 1024 + 900] = -math.inf
    x[9 * 1024 + 3] = math.nan
    x[-600:] = pattern.repeat(100).flip(0).to(dtype)  # the last, partial block
    idx = torch.randint(0, n, (300,), generator=g)
    x[idx] = pattern.repeat(50).to(dtype)  # scattered over chunks
    return x


@pytest.mark.parametrize("n", [4 * 65536 + 1000, 1_000_003])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("layout", [(6, -48, 64), (0, -126, 254), (7, -126, 254), (3, -2, 4)])
def test_zero_ids_and_non_finite_blocks(dtype, n, layout):
    k, emin, octaves = layout
    x = _zero_id_mix(dtype, n)
    values = exact_f64(x)
    want_c, want_m = tensor_summary_ref(values, k, emin, octaves)
    for histogram in (True, False):
        got_c, got_m = _summarize(x, k, emin, octaves, histogram)
        assert_counts_equal(got_c, want_c, histogram=histogram)
        assert_moments_close(got_m, want_m, values)


_BASELINE_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from dnntrace import _C, ops
    from dnntrace.storage import layout as L
    from dnntrace.storage.layout import Layout
    assert _C.cpu_kernel_isa() == sys.argv[3], (_C.cpu_kernel_isa(), sys.argv[3])
    xs = torch.load(sys.argv[1])
    lay = Layout(6, -48, 64)
    out = {}
    for i, x in enumerate(xs):
        for h in (0, 1):
            c = torch.zeros((1, lay.width), dtype=torch.int64)
            m = torch.zeros((1, L.NUM_MOMENTS), dtype=torch.float64)
            m[:, L.MIN], m[:, L.MAX] = float("inf"), float("-inf")
            ops.tensor_summary_out(x, 0, c, m, lay, histogram=bool(h))
            out[f"c{i}_{h}"], out[f"m{i}_{h}"] = c[0].numpy(), m[0].numpy()
    np.savez(sys.argv[2], **out)
    """
)


def _isas_here() -> list[str]:
    """The kernel versions this CPU can run, from torch's own detection (an independent truth:
    it does not ask our dispatcher)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": ["baseline", "avx2", "avx512"], "AVX2": ["baseline", "avx2"]}.get(
        cap, ["baseline"]
    )


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_version_matches_the_reference_and_this_machines(tmp_path, isa):
    """Each version this CPU runs, forced by DNNTRACE_CPU_ISA (read once per process, hence the
    subprocess): bit-identical integer fields, close sums, and the same integer fields as the
    version this process runs."""
    if platform.machine() not in ("x86_64", "AMD64") and isa != "baseline":
        pytest.skip("x86-64 versions only")
    if isa not in _isas_here():
        pytest.skip(f"this CPU has no {isa} (torch: {torch.backends.cpu.get_cpu_capability()})")
    xs = []
    for dtype in LOW:
        g = torch.Generator().manual_seed(7)
        xs.append((torch.randn(300_007, generator=g) * 40).exp().to(dtype))
        xs.append(_zero_id_mix(dtype, 4 * 65536 + 1000))
        xs.append(torch.full((SUB_RANGE + 5,), -1.25, dtype=dtype))
        xs.append(torch.randn(3000, generator=g).to(dtype))  # the direct (small input) path
        xs.append((torch.randn(1_000_003, generator=g) * 1e-3).to(dtype))  # many chunks
    torch.save(xs, tmp_path / "xs.pt")
    env = dict(os.environ, DNNTRACE_CPU_ISA=isa)
    env.pop("DNNTRACE_CPU_BASELINE", None)
    subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT, str(tmp_path / "xs.pt"), str(tmp_path / "o"), isa],
        env=env,
        check=True,
        timeout=600,
    )
    base = np.load(tmp_path / "o.npz")
    for i, x in enumerate(xs):
        values = exact_f64(x)
        want_c, want_m = tensor_summary_ref(values, 6, -48, 64)
        for h in (0, 1):
            assert_counts_equal(base[f"c{i}_{h}"], want_c, histogram=bool(h))
            assert_moments_close(base[f"m{i}_{h}"], want_m, values)
            here_c, _ = _summarize(x, 6, -48, 64, bool(h))
            np.testing.assert_array_equal(here_c, base[f"c{i}_{h}"])


def test_this_machine_runs_its_best_kernel():
    """Without DNNTRACE_CPU_ISA the dispatcher picks the best version torch also finds here."""
    if os.environ.get("DNNTRACE_CPU_ISA") or os.environ.get("DNNTRACE_CPU_BASELINE"):
        pytest.skip("a version is forced in this environment")
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("torch's detection is capped in this environment")
    want = _isas_here()[-1] if platform.machine() in ("x86_64", "AMD64") else "baseline"
    assert _C.cpu_kernel_isa() == want


def test_an_unknown_version_name_is_named_and_ignored():
    """A misspelt DNNTRACE_CPU_ISA gets one line on stderr; the best version runs."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the variable chooses among x86-64 versions only")
    env = dict(os.environ, DNNTRACE_CPU_ISA="avx-2")
    env.pop("DNNTRACE_CPU_BASELINE", None)
    code = "import torch; from dnntrace import _C; print(_C.cpu_kernel_isa())"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "DNNTRACE_CPU_ISA=avx-2 is not baseline, avx2 or avx512; ignored" in r.stderr
    if not os.environ.get("ATEN_CPU_CAPABILITY"):
        assert r.stdout.strip() == _isas_here()[-1]
