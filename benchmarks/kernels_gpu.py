"""Check the Triton kernels against their torch references on a GPU, and time them at LLaDA-8B
shapes (issue 6). One script, one run, every number side by side.

    python benchmarks/kernels_gpu.py --check                  # correctness table
    python benchmarks/kernels_gpu.py --time                   # timing tables (LLaDA-8B shapes, bf16)
    python benchmarks/kernels_gpu.py --all --json out.json    # both, and every number as JSON
    python benchmarks/kernels_gpu.py --all --smoke            # tiny shapes on CPU, Triton interpreter

What ``--check`` compares (CUDA, seeded random data):

* every ``triton_*`` launcher in kernels/ against its ``*_reference`` on odd lengths, 1 / some /
  all rows active, GQA ratios 1 and 4, no mask / key padding / full / additive masks, -1 padded
  row lists where the op takes them, fp32 and bf16, approximate attention in both modes. The
  ground truth is the reference run on fp32 inputs (bf16 inputs upcast), so a bf16 row shows the
  kernel's own rounding against exact arithmetic;
* the ``torch.ops.dyllm.*`` ops: their CUDA (Triton) registration, that a call on CUDA tensors
  reaches the Triton launcher, ``torch.library.opcheck`` on CUDA tensors, and ``torch.compile``
  of small functions that call them, against eager.

What ``--time`` measures (B 1, seq 1024, 32 heads of 128, 32 KV heads, d_model 4096, MLP 12288,
bf16; active fractions 5 / 10 / 25 / 100 %): partial attention, approximate attention (mode 1 and
2), saliency, cache scatter and the gathered SwiGLU MLP + o_proj, each against what the dense
model pays. Two numbers per variant: ``ms`` is the replay time of a CUDA graph of one call,
queued while the GPU is still busy (the device time, no launch latency in it); ``eager ms`` is
one eager call on an idle, synchronised device (the host-side launch work of each kernel
included). Both are medians over ``--reps`` after ``--warmup`` calls, the L2 cache flushed
before each. The approximate-attention table also times ``index_prep``, the launcher's
row-list preparation (``unique_rows`` + ``salient_slots``), which both Triton modes include.

Robustness: on CUDA every section runs in its own subprocess (``--no-isolate`` to turn it off),
so an exception is recorded and the next case runs, and even a CUDA fault that poisons a
process's context costs only its section. A soft deadline (``--deadline-s``) skips what is left
rather than overrun. Results are written to ``--json`` after every section.

Imports: the script loads ``dyllm_fx.kernels`` straight from this checkout (``kernels/``), without
the package being installed and without running ``dyllm_fx/__init__.py`` (which needs
transformers): only torch and triton are needed. DYLLM_TRITON=1 (the CUDA registration of the
kernels) and, with ``--smoke``, TRITON_INTERPRET=1 are set here before anything imports Triton.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _prepare_environment(argv: list[str]) -> None:
    """Set the variables Triton and dyllm_fx read at import time, before either is imported."""
    if "--smoke" in argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors
    os.environ.setdefault("DYLLM_TRITON", "1")  # register the Triton kernels for CUDA tensors


_prepare_environment(sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _import_kernels() -> types.SimpleNamespace:
    """The kernel modules of this checkout, as ``dyllm_fx.kernels.*``.

    When ``dyllm_fx`` is not imported yet, a bare package object stands in for it (its
    ``__init__`` pulls in transformers and the whole runtime, none of which the kernels need), and
    ``dyllm_fx.kernels`` is loaded from ``kernels/`` as the pyproject's package-dir mapping does.
    """
    if "dyllm_fx" not in sys.modules:
        pkg = types.ModuleType("dyllm_fx")
        pkg.__path__ = [str(ROOT / "dyllm_fx")]
        sys.modules["dyllm_fx"] = pkg
        spec = importlib.util.spec_from_file_location(
            "dyllm_fx.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules["dyllm_fx.kernels"] = mod
        spec.loader.exec_module(mod)
        pkg.kernels = mod
    names = ("_triton", "ops", "cache_scatter", "partial_attention", "saliency", "approx_attention", "gathered_mlp")
    return types.SimpleNamespace(**{n.lstrip("_"): importlib.import_module(f"dyllm_fx.kernels.{n}") for n in names})


K = _import_kernels()
OPS = torch.ops.dyllm

CHECK_SECTIONS = ("check_scatter", "check_partial", "check_saliency", "check_approx", "check_mlp", "check_ops")
TIME_SECTIONS = ("time_partial", "time_approx", "time_saliency", "time_scatter", "time_mlp")
OP_NAMES = ("cache_write_rows", "partial_attention", "partial_attention_stats", "saliency", "approx_attention")


# --------------------------------------------------------------------------- settings


@dataclass
class CheckSizes:
    """Shapes the comparisons draw from."""

    lengths: tuple[int, ...]  # sequence lengths (odd, and over one 64-row tile on a GPU)
    dims: tuple[int, ...]  # head dims; the first is the one the fixed cases use
    big_rows: int  # saliency rows (over one 1024-row compaction block on a GPU)
    mlp: tuple[int, int]  # (d_model, hidden) of the gathered-MLP check
    max_cases: int | None = None  # per section and dtype (the smoke run keeps the first few)

    def limit(self, cases: list) -> list:
        """The cases to run: the lists put their most different cases first."""
        return cases[: self.max_cases] if self.max_cases else cases


@dataclass
class TimeSizes:
    """The shapes of one LLaDA-8B layer (or a tiny stand-in for --smoke)."""

    batch: int = 1
    seq: int = 1024
    heads: int = 32
    kv_heads: int = 32
    head_dim: int = 128
    d_model: int = 4096
    hidden: int = 12288
    fractions: tuple[float, ...] = (0.05, 0.10, 0.25, 1.0)


GPU_CHECK = CheckSizes(lengths=(37, 130, 515), dims=(128, 64, 40), big_rows=2500, mlp=(256, 768))
SMOKE_CHECK = CheckSizes(lengths=(5, 7, 13), dims=(8,), big_rows=21, mlp=(16, 48), max_cases=3)
GPU_TIME = TimeSizes()
SMOKE_TIME = TimeSizes(seq=16, heads=2, kv_heads=2, head_dim=16, d_model=32, hidden=96, fractions=(0.1, 1.0))

# (atol, rtol) per dtype: fp32 kernels use exact IEEE dots; 16-bit ones round their output (and
# the softmax weights before the P.V product) to 8 (bf16) or 11 (fp16) mantissa bits.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (3e-2, 3e-2)}
# The softmax statistics stay fp32 inside the kernels whatever the input dtype.
STATS_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 1e-3)}


@dataclass
class Run:
    """What one section needs: device, dtypes, sizes, timing settings, the deadline and the results."""

    device: torch.device
    smoke: bool
    half: torch.dtype  # the 16-bit dtype checked (fp16 under the interpreter, which has no bf16 dot)
    time_dtype: torch.dtype
    check: CheckSizes
    sizes: TimeSizes
    warmup: int
    reps: int
    deadline: float  # time.time() after which remaining cases are skipped
    compile_backend: str
    results: dict = field(default_factory=lambda: {"cases": [], "timings": [], "errors": []})
    on_record: object = None  # called after each recorded case / timing (writes the partial JSON)

    @property
    def dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        return (torch.float32, self.half)

    def past_deadline(self) -> bool:
        return time.time() > self.deadline

    def record(self, kind: str, item: dict) -> None:
        self.results[kind].append(item)
        if self.on_record:
            self.on_record()


def _say(msg: str) -> None:
    print(msg, flush=True)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


def _error_text(exc: BaseException) -> dict:
    """The exception and the last lines of its traceback, short enough for a table and a JSON."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}"[:1500], "traceback": "".join(tb)[-3000:]}


# --------------------------------------------------------------------------- comparisons


def compare(label: str, got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float], dtype=None) -> dict:
    """Max abs error, relative norm error and pass (|got - want| <= atol + rtol |want| everywhere;
    equal infinities and NaN at the same place count as equal; a shape or dtype mismatch fails)."""
    atol, rtol = tol
    res = {"label": label, "max_abs_err": math.inf, "rel_err": math.inf, "ok": False, "tol": f"{atol:g}/{rtol:g}"}
    if tuple(got.shape) != tuple(want.shape):
        res["note"] = f"shape {tuple(got.shape)} != {tuple(want.shape)}"
        return res
    if dtype is not None and got.dtype != dtype:
        res["note"] = f"dtype {got.dtype} != {dtype}"
        return res
    g, w = got.detach().double(), want.detach().double()
    same = (g == w) | (g.isnan() & w.isnan())
    diff = torch.where(same, torch.zeros_like(g), (g - w).abs()).nan_to_num(nan=math.inf)
    finite_w = torch.where(w.isfinite(), w, torch.zeros_like(w))
    bound = atol + rtol * finite_w.abs()
    res["ok"] = bool((diff <= bound).all())
    res["max_abs_err"] = float(diff.max()) if diff.numel() else 0.0
    if diff.numel():
        res["rel_err"] = float(diff.nan_to_num(posinf=0.0).norm() / finite_w.norm().clamp_min(1e-30))
    else:
        res["rel_err"] = 0.0
    return res


def exact(label: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    return compare(label, got, want, (0.0, 0.0), want.dtype)


def run_case(run: Run, section: str, name: str, dtype, fn) -> None:
    """Run one check (``fn`` returns a list of :func:`compare` results) and record it; an
    exception becomes an ``error`` row and the next case runs."""
    row = {"section": section, "case": name, "dtype": _short(dtype) if dtype is not None else "-"}
    if run.past_deadline():
        row.update(status="skipped", note="deadline")
        run.record("cases", row)
        _say(f"  skip  {section:15s} {name} (deadline)")
        return
    t0 = time.perf_counter()
    try:
        outputs = fn()
        if outputs is None:  # the check does not apply here (e.g. CUDA registration on CPU)
            row.update(status="skipped", note="not on this device")
        else:
            main = outputs[0]
            row.update(
                status="pass" if all(o["ok"] for o in outputs) else "fail",
                max_abs_err=main["max_abs_err"], rel_err=main["rel_err"], tol=main["tol"], outputs=outputs,
            )
    except Exception as exc:  # noqa: BLE001 - recorded, and the next case runs
        row.update(status="error", **_error_text(exc))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    run.record("cases", row)
    err = f"{row['max_abs_err']:.2e}" if "max_abs_err" in row else row.get("error", row.get("note", ""))[:160]
    _say(f"  {row['status']:5s} {section:15s} {name} [{row['dtype']}] {err} ({row['seconds']:.1f}s)")


# --------------------------------------------------------------------------- random inputs


class Draw:
    """Seeded random tensors, drawn on the CPU (the same values on any device) and moved."""

    def __init__(self, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device

    def randn(self, *shape, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(shape, generator=self.gen)).to(self.device, dtype)

    def rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen).to(self.device)

    def rows(self, bsz: int, n: int, seq_len: int, sort: bool = False) -> torch.Tensor:
        """(B, n) distinct positions per batch element (unsorted unless ``sort``)."""
        r = torch.stack([torch.randperm(seq_len, generator=self.gen)[:n] for _ in range(bsz)])
        return (r.sort(1).values if sort else r).to(self.device)

    def mask(self, kind, bsz: int, seq_len: int):
        """An SDPA mask of the layouts the kernels take; no query row is masked everywhere."""
        if kind == "key":  # key padding: the first keys of the last batch element are padding
            m = torch.ones(bsz, 1, 1, seq_len, dtype=torch.bool)
            m[-1, ..., : min(3, seq_len - 1)] = False
        elif kind == "full":
            m = torch.rand(bsz, 1, seq_len, seq_len, generator=self.gen) > 0.3
            m[..., 0] = True
        elif kind == "float":  # additive, broadcast over the batch
            m = torch.randn(1, 1, 1, seq_len, generator=self.gen)
        else:
            return None
        return m.to(self.device)


def _count(kind, seq_len: int, rng: random.Random) -> int:
    """How many rows are active: one, all, or some in between."""
    if kind == "one":
        return 1
    if kind == "all":
        return seq_len
    return rng.randint(2, max(2, seq_len - 1))


def _up(x):
    """fp32 copy of a floating tensor (the ground truth runs in fp32); others unchanged."""
    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


# --------------------------------------------------------------------------- check: cache scatter


def _scatter_inputs(draw: Draw, p: dict, dtype):
    bsz, seq_len, n = p["bsz"], p["L"], p["n"]
    shape = (bsz, 2, seq_len, 8) if p["dim"] == 2 else (bsz, seq_len, 24)
    cache = draw.randn(*shape, dtype=dtype)
    rows = draw.rows(bsz, n, seq_len)
    values = draw.randn(*shape[: p["dim"]], n, *shape[p["dim"] + 1:], dtype=dtype)
    if p["extra"] == "repeat":  # bucket padding by repeating the last row with its values
        rows = torch.cat([rows, rows[:, -1:]], 1)
        values = torch.cat([values, values.narrow(p["dim"], n - 1, 1)], p["dim"])
    elif p["extra"] == "pad":  # a -1 entry, which the kernel skips
        rows = torch.cat([rows, torch.full_like(rows[:, :1], -1)], 1)
        values = torch.cat([values, draw.randn(*values.narrow(p["dim"], 0, 1).shape, dtype=dtype)], p["dim"])
    return cache, rows, values


def _scatter_truth(cache, rows, values, dim):
    """The reference scatter, batch element by batch element, leaving out -1 rows (the
    reference raises on them; the kernel skips them)."""
    want = cache.clone()
    for b in range(rows.shape[0]):
        keep = (rows[b] >= 0).nonzero().flatten()
        K.cache_scatter.cache_write_rows_reference(
            want[b: b + 1], rows[b: b + 1, keep], values[b: b + 1].index_select(dim, keep), dim
        )
    return want


def check_scatter(run: Run) -> None:
    rng = random.Random(1)
    layouts = ((2, "one", None), (1, "some", "pad"), (2, "some", "repeat"), (1, "all", None),
               (2, "some", "pad"), (1, "some", "repeat"), (2, "all", None), (1, "one", None))
    cases = [dict(dim=dim, bsz=2, L=rng.choice(run.check.lengths), n_kind=n_kind, extra=extra)
             for dim, n_kind, extra in layouts]
    for dtype in run.dtypes:
        for i, p in enumerate(run.check.limit(cases)):
            p = dict(p, n=_count(p["n_kind"], p["L"], rng))
            name = f"dim{p['dim']} L{p['L']} rows {p['n_kind']}({p['n']}){' ' + p['extra'] if p['extra'] else ''}"

            def fn(p=p, dtype=dtype, seed=i):
                cache, rows, values = _scatter_inputs(Draw(seed, run.device), p, dtype)
                want = _scatter_truth(cache, rows, values, p["dim"])
                K.cache_scatter.triton_cache_write_rows(cache, rows, values, p["dim"])
                return [exact("cache", cache, want)]

            run_case(run, "cache_scatter", name, dtype, fn)


# --------------------------------------------------------------------------- check: partial attention


def _partial_cases(run: Run) -> list[dict]:
    """Fixed cases covering the corners, then a few drawn at random (seeded)."""
    rng = random.Random(2)
    lengths, d0 = run.check.lengths, run.check.dims[0]
    fixed = [
        dict(bsz=1, kv=2, group=1, n_kind="one", mask=None, scale=None),
        dict(bsz=2, kv=2, group=4, n_kind="all", mask="key", scale=None),
        dict(bsz=2, kv=1, group=4, n_kind="some", mask="full", scale=None),
        dict(bsz=2, kv=2, group=1, n_kind="some", mask="float", scale=0.3),
        dict(bsz=2, kv=2, group=4, n_kind="one", mask="key", scale=None),
        dict(bsz=1, kv=2, group=1, n_kind="all", mask="full", scale=None),
    ]
    cases = [dict(c, L=lengths[i % len(lengths)], d=d0) for i, c in enumerate(fixed)]
    for _ in range(2):
        cases.append(dict(
            bsz=rng.randint(1, 2), kv=rng.randint(1, 2), group=rng.choice([1, 4]), n_kind="some",
            mask=rng.choice([None, "key", "full", "float"]), scale=rng.choice([None, 0.2]),
            L=rng.choice(lengths), d=rng.choice(run.check.dims),
        ))
    for c in cases:
        c["n"] = _count(c["n_kind"], c["L"], rng)
    return cases


def _partial_inputs(draw: Draw, p: dict, dtype):
    heads = p["kv"] * p["group"]
    q = draw.randn(p["bsz"], heads, p["n"], p["d"], dtype=dtype)
    k = draw.randn(p["bsz"], p["kv"], p["L"], p["d"], dtype=dtype)
    v = draw.randn(p["bsz"], p["kv"], p["L"], p["d"], dtype=dtype)
    rows = draw.rows(p["bsz"], p["n"], p["L"])
    return q, k, v, rows, draw.mask(p["mask"], p["bsz"], p["L"]), p["scale"]


def _partial_name(p: dict) -> str:
    return (f"B{p['bsz']} H{p['kv'] * p['group']}/KV{p['kv']} L{p['L']} d{p['d']} rows {p['n_kind']}({p['n']}) "
            f"mask {p['mask']}{'' if p['scale'] is None else ' scale ' + str(p['scale'])}")


def check_partial(run: Run) -> None:
    pa = K.partial_attention
    for dtype in run.dtypes:
        for i, p in enumerate(run.check.limit(_partial_cases(run))):

            def fn(p=p, dtype=dtype, seed=100 + i):
                args = _partial_inputs(Draw(seed, run.device), p, dtype)
                want, want_m, want_l = pa.partial_attention_stats_reference(*map(_up, args))
                out, m, l = pa.triton_partial_attention(*args, return_stats=True)
                plain = pa.triton_partial_attention(*args)
                tol, stol = TOL[dtype], STATS_TOL[dtype]
                res = [compare("out", out, want, tol, dtype), compare("m", m, want_m, stol, torch.float32),
                       compare("l", l, want_l, stol, torch.float32), compare("out(no stats)", plain, want, tol, dtype)]
                if not plain.is_contiguous():
                    res.append({"label": "contiguous", "ok": False, "max_abs_err": 0.0, "rel_err": 0.0, "tol": "-"})
                return res

            run_case(run, "partial_attn", _partial_name(p), dtype, fn)


# --------------------------------------------------------------------------- check: saliency


def check_saliency(run: Run) -> None:
    sa = K.saliency
    small, big = run.check.lengths[1], run.check.big_rows
    d = run.check.dims[0]
    cases = [  # (layout, rows, tau, candidate range as fractions of the rows)
        ("heads", small, 0.9, (0.0, 1.0)), ("rows", small, 0.5, (0.3, 1.0)),
        ("heads", big, 0.99, (0.25, 1.0)), ("rows", big, 1.01, (0.0, 1.0)),  # 1.01: every row salient
        ("heads", small, -1.5, (0.0, 1.0)), ("heads", small, 0.9, (0.5, 0.5)),  # none; an empty range
    ]
    for dtype in run.dtypes:
        for i, (layout, n_rows, tau, (lo, hi)) in enumerate(run.check.limit(cases)):
            start, end = round(lo * n_rows), round(hi * n_rows)
            name = f"{layout} N{n_rows} tau {tau} range [{start}, {end})"

            def fn(layout=layout, n_rows=n_rows, tau=tau, start=start, end=end, dtype=dtype, seed=200 + i):
                draw = Draw(seed, run.device)
                shape = (2, 4, n_rows, d) if layout == "heads" else (2, n_rows, 3 * d)
                new = draw.randn(*shape)
                # Each row moves by its own amount, so the cosines spread over the thresholds.
                amount = draw.rand(2, 1, n_rows, 1) if layout == "heads" else draw.rand(2, n_rows, 1)
                cached = (new + amount * draw.randn(*shape)).to(dtype)
                new = new.to(dtype)
                idx, count, cos = sa.triton_saliency(new, cached, tau, start, end)
                _, _, want_cos = sa.saliency_reference(_up(new), _up(cached), tau, start, end)
                # The compaction exactly, on the kernel's own cosines (no flips at cos == tau).
                want_idx, want_count = sa.select_salient_reference(cos, tau, start, end)
                return [compare("cos", cos, want_cos, (1e-5, 1e-5), torch.float32),
                        exact("indices", idx, want_idx), exact("count", count, want_count)]

            run_case(run, "saliency", name, dtype, fn)


# --------------------------------------------------------------------------- check: approx attention


def _approx_cases(run: Run) -> list[dict]:
    rng = random.Random(3)
    lengths, d0 = run.check.lengths, run.check.dims[0]
    fixed = [
        dict(group=4, mask="key", salient="changed", pad=True, mode=1, n_kind="some"),
        dict(group=1, mask="full", salient="other", pad=True, mode=2, n_kind="one"),
        dict(group=4, mask=None, salient="none", pad=False, mode=1, n_kind="all"),
        dict(group=1, mask="key", salient="none", pad=True, mode=2, n_kind="some"),
        dict(group=4, mask=None, salient="changed", pad=False, mode=2, n_kind="all"),
        dict(group=1, mask=None, salient="changed", pad=False, mode=1, n_kind="one"),
        dict(group=4, mask="full", salient="other", pad=False, mode=1, n_kind="all"),
    ]
    cases = [dict(c, L=lengths[i % len(lengths)], d=d0) for i, c in enumerate(fixed)]
    for _ in range(2):
        cases.append(dict(
            group=rng.choice([1, 4]), mask=rng.choice([None, "key", "full"]),
            salient=rng.choice(["changed", "other", "none"]), pad=rng.random() < 0.5, mode=rng.choice([1, 2]),
            n_kind="some", L=rng.choice(lengths), d=rng.choice(run.check.dims),
        ))
    for c in cases:
        c["n"] = _count(c["n_kind"], c["L"], rng)
    return cases


def _approx_inputs(draw: Draw, p: dict, dtype):
    """(args, kwargs-free extra) of one approx_attention call; built in fp32, then cast."""
    bsz, kv, n_rows, d, n = 2, 2, p["L"], p["d"], p["n"]
    heads = kv * p["group"]
    q = draw.randn(bsz, heads, n_rows, d)
    k = draw.randn(bsz, kv, n_rows, d)
    changed = draw.rows(bsz, n, n_rows)
    dv_rows = draw.randn(bsz, kv, n, d, scale=0.1)
    cached = draw.randn(bsz, heads, n_rows, d)
    if p["pad"]:  # a repeat of the first changed row and a -1 slot
        changed = torch.cat([changed, changed[:, :1], torch.full_like(changed[:, :1], -1)], 1)
        dv_rows = torch.cat([dv_rows, dv_rows[:, :, :1], draw.randn(bsz, kv, 1, d)], 2)
    if p["salient"] == "changed":
        sal = changed
    elif p["salient"] == "other":
        sal = draw.rows(bsz, max(1, n_rows // 3), n_rows)
    else:
        sal = changed[:, :0]
    sal_ctx = draw.randn(bsz, heads, sal.shape[1], d)
    if p["pad"] and p["salient"] == "changed":
        sal_ctx[:, :, n] = sal_ctx[:, :, 0]  # a repeated row carries the same exact context
    mask = draw.mask(p["mask"], bsz, n_rows)
    extra = ()
    if p["mode"] == 2:  # last step's keys of the changed rows, and last step's softmax statistics
        k_old = K.cache_scatter.gather_rows(k, changed.clamp_min(0), 2)
        k_old = k_old + draw.randn(*k_old.shape, scale=0.1)
        bias = K.partial_attention.attention_bias(mask, None, bsz, n_rows)
        s = K.partial_attention.scores_reference(q, k, bias, 1 / math.sqrt(d))
        extra = (k_old, *K.partial_attention.softmax_stats(s + draw.randn(*s.shape, scale=0.05)))
    cast = lambda x: x.to(dtype) if x.is_floating_point() else x  # noqa: E731
    args = tuple(cast(x) for x in (q, k, changed, dv_rows, cached, sal, sal_ctx))
    extra = tuple(cast(x) if i == 0 else x for i, x in enumerate(extra))  # m_old / l_old stay fp32
    return args + (mask, None) + extra


def check_approx(run: Run) -> None:
    aa = K.approx_attention
    for dtype in run.dtypes:
        for i, p in enumerate(run.check.limit(_approx_cases(run))):
            name = (f"mode {p['mode']} H{2 * p['group']}/KV2 N{p['L']} d{p['d']} changed {p['n_kind']}({p['n']}) "
                    f"salient {p['salient']} mask {p['mask']}{' -1/repeat pad' if p['pad'] else ''}")

            def fn(p=p, dtype=dtype, seed=300 + i):
                args = _approx_inputs(Draw(seed, run.device), p, dtype)
                ctx, stats, m, l = aa.triton_approx_attention(*args)
                w_ctx, w_stats, w_m, w_l = aa.approx_attention_reference(*map(_up, args))
                tol, stol = TOL[dtype], STATS_TOL[dtype]
                return [compare("ctx", ctx, w_ctx, tol, dtype), compare("stats", stats, w_stats, tol, torch.float32),
                        compare("m", m, w_m, stol, torch.float32), compare("l", l, w_l, stol, torch.float32)]

            run_case(run, "approx_attn", name, dtype, fn)


# --------------------------------------------------------------------------- check: gathered MLP


def _swiglu(w: dict):
    """o_proj then a SwiGLU MLP, as one row-wise function (the shape of a LLaDA layer's tail)."""
    def fn(x):
        y = F.linear(x, w["o"])
        return F.linear(F.silu(F.linear(y, w["gate"])) * F.linear(y, w["up"]), w["down"])
    return fn


def _swiglu_weights(draw: Draw, d_model: int, hidden: int, dtype) -> dict:
    s_in, s_hid = d_model ** -0.5, hidden ** -0.5
    return {"o": draw.randn(d_model, d_model, dtype=dtype, scale=s_in),
            "gate": draw.randn(hidden, d_model, dtype=dtype, scale=s_in),
            "up": draw.randn(hidden, d_model, dtype=dtype, scale=s_in),
            "down": draw.randn(d_model, hidden, dtype=dtype, scale=s_hid)}


def check_mlp(run: Run) -> None:
    d_model, hidden = run.check.mlp
    seq_len = run.check.lengths[1]
    rng = random.Random(4)
    for dtype in run.dtypes:
        for i, n_kind in enumerate(("one", "some", "all")):
            n = _count(n_kind, seq_len, rng)

            def fn(n=n, dtype=dtype, seed=400 + i):
                draw = Draw(seed, run.device)
                w = _swiglu_weights(draw, d_model, hidden, dtype)
                h = draw.randn(2, seq_len, d_model, dtype=dtype)
                rows = draw.rows(2, n, seq_len)
                with torch.no_grad():
                    out = K.gathered_mlp.gathered_rows_apply(_swiglu(w), h, rows)
                    dense = _swiglu(w)(h)  # the same dtype: this checks the rows, not the GEMMs
                untouched = torch.ones(2, seq_len, dtype=torch.bool, device=run.device).scatter_(1, rows, False)
                return [compare("rows", K.ops.gather_rows(out, rows, 1), K.ops.gather_rows(dense, rows, 1),
                                TOL[dtype], dtype),
                        exact("other rows zero", out[untouched], torch.zeros_like(out[untouched]))]

            run_case(run, "gathered_mlp", f"D{d_model} F{hidden} L{seq_len} rows {n_kind}({n})", dtype, fn)


# --------------------------------------------------------------------------- check: the dyllm:: ops


def _op_args(run: Run, name: str, variant: str):
    """fp32 arguments of one op call on the run's device (small shapes)."""
    draw = Draw(500, run.device)
    seq_len, d = run.check.lengths[1], 8 if run.smoke else 16
    if name == "cache_write_rows":
        rows = draw.rows(2, 3, seq_len)
        if variant == "dim2":
            return (draw.randn(2, 2, seq_len, d), rows, draw.randn(2, 2, 3, d), 2)
        return (draw.randn(2, seq_len, 3 * d), rows, draw.randn(2, 3, 3 * d), 1)
    if name in ("partial_attention", "partial_attention_stats"):
        group = 4 if variant.startswith("gqa4") else 1
        p = dict(bsz=2, kv=2, group=group, n=3, L=seq_len, d=d, scale=None,
                 mask={"gqa1": None, "gqa4 key": "key", "gqa4 full": "full"}[variant])
        return _partial_inputs(draw, p, torch.float32)
    if name == "saliency":
        shape = (2, 3, seq_len, d) if variant == "heads" else (2, seq_len, 3 * d)
        new = draw.randn(*shape)
        return (new, new + draw.randn(*shape, scale=0.5), 0.8, 1, seq_len)
    p = dict(group=2, mask="key", salient="changed", pad=True, mode=int(variant[-1]), n=3, L=seq_len, d=d)
    return _approx_inputs(draw, p, torch.float32)


OPCHECKS = (  # per op, the first argument set is the one the smoke run keeps
    ("cache_write_rows", "dim2"), ("cache_write_rows", "dim1"),
    ("partial_attention", "gqa4 key"), ("partial_attention", "gqa1"), ("partial_attention", "gqa4 full"),
    ("partial_attention_stats", "gqa4 key"), ("saliency", "heads"), ("saliency", "rows"),
    ("approx_attention", "mode 2"), ("approx_attention", "mode 1"),
)


def _device_launcher(run: Run, name: str):
    """What a call of ``dyllm::name`` should run on this device: Triton on CUDA (DYLLM_TRITON=1),
    the op's CPU path on CPU (the reference, or the lean ``*_fast`` version where kernels/dispatch.py
    registers one)."""
    cuda = run.device.type == "cuda"
    pa = K.partial_attention
    table = {
        "cache_write_rows": (K.cache_scatter.triton_cache_write_rows, K.cache_scatter.cache_write_rows_reference),
        "partial_attention": (pa.triton_partial_attention, pa.partial_attention_reference),
        "partial_attention_stats": (
            lambda *a: pa.triton_partial_attention(*a, return_stats=True), pa.partial_attention_stats_fast,
        ),
        "saliency": (K.saliency.triton_saliency, K.saliency.saliency_reference),
        "approx_attention": (K.approx_attention.triton_approx_attention, K.approx_attention.approx_attention_fast),
    }
    return table[name][0 if cuda else 1]


def _dispatch_check(run: Run, name: str, variant: str) -> list[dict]:
    """The op's output is bit for bit what the device's launcher gives (the call reached it)."""
    args = _op_args(run, name, variant)
    if name == "cache_write_rows":
        via_op, direct = args[0].clone(), args[0].clone()
        getattr(OPS, name)(via_op, *args[1:])
        _device_launcher(run, name)(direct, *args[1:])
        return [exact("cache", via_op, direct)]
    got, want = getattr(OPS, name)(*args), _device_launcher(run, name)(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    return [exact(f"out{i}", g, w) for i, (g, w) in enumerate(zip(got, want))]


def _opcheck(run: Run, name: str, variant: str) -> list[dict]:
    args = _op_args(run, name, variant)
    report = torch.library.opcheck(getattr(OPS, name).default, args)
    failed = {k: v for k, v in report.items() if v != "SUCCESS"}
    return [{"label": "opcheck", "ok": not failed, "max_abs_err": 0.0, "rel_err": 0.0, "tol": "-",
             "note": json.dumps(report)}]


def _compiled_vs_eager(run: Run, fn, make_args, n_calls: int = 2) -> list[dict]:
    """torch.compile(fn) (fullgraph, so a graph break fails) against eager, on ``n_calls``
    argument sets of different sizes; mutated inputs compared too."""
    compiled = torch.compile(fn, backend=run.compile_backend, fullgraph=True)
    res = []
    for call in range(n_calls):
        args = make_args(call)
        eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        want = fn(*eager_args)
        got = compiled(*args)
        res.append(compare(f"out call {call}", got, want, TOL[torch.float32], want.dtype))
        for i, (a, b) in enumerate(zip(args, eager_args)):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                res.append(compare(f"arg{i} call {call}", a, b, TOL[torch.float32]))
    return res


def _compile_partial(run: Run) -> list[dict]:
    def fn(q_all, k, v, rows):
        q = K.ops.gather_rows(q_all, rows, 2) * 1.5
        return OPS.partial_attention(q, k, v, rows, None, None) * 2 + 1

    def make_args(call):
        draw, seq_len, d = Draw(600 + call, run.device), run.check.lengths[1], 16
        return (draw.randn(1, 4, seq_len, d), draw.randn(1, 2, seq_len, d), draw.randn(1, 2, seq_len, d),
                draw.rows(1, 2 + call, seq_len, sort=True))

    return _compiled_vs_eager(run, fn, make_args)


def _compile_write_then_attend(run: Run) -> list[dict]:
    def fn(q_all, k_cache, v_cache, k_new, v_new, rows, mask):
        OPS.cache_write_rows(k_cache, rows, k_new, 2)
        OPS.cache_write_rows(v_cache, rows, v_new, 2)
        q = K.ops.gather_rows(q_all, rows, 2)
        return OPS.partial_attention(q, k_cache, v_cache, rows, mask, None)

    def make_args(call):
        draw, seq_len, d, n = Draw(700 + call, run.device), run.check.lengths[1], 16, 2 + call
        return (draw.randn(2, 4, seq_len, d), draw.randn(2, 2, seq_len, d), draw.randn(2, 2, seq_len, d),
                draw.randn(2, 2, n, d), draw.randn(2, 2, n, d), draw.rows(2, n, seq_len), draw.mask("key", 2, seq_len))

    return _compiled_vs_eager(run, fn, make_args)


def check_ops(run: Run) -> None:
    cuda = run.device.type == "cuda"
    for name in OP_NAMES:
        def registered(name=name):
            if not cuda:
                return None
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"dyllm::{name}", "CUDA")
            return [{"label": "CUDA kernel", "ok": bool(ok), "max_abs_err": 0.0, "rel_err": 0.0, "tol": "-",
                     "note": f"DYLLM_TRITON={os.environ.get('DYLLM_TRITON')}"}]
        run_case(run, "ops", f"{name}: CUDA kernel registered", None, registered)
    opchecks = OPCHECKS
    if run.check.max_cases:  # the smoke run: one argument set per op
        first = {}
        for name, variant in OPCHECKS:
            first.setdefault(name, (name, variant))
        opchecks = tuple(first.values())
    for name, variant in opchecks:
        run_case(run, "ops", f"{name} ({variant}): op call == {'triton' if cuda else 'CPU'} launcher",
                 torch.float32, lambda n=name, v=variant: _dispatch_check(run, n, v))
    for name, variant in opchecks:
        run_case(run, "ops", f"opcheck {name} ({variant})", torch.float32,
                 lambda n=name, v=variant: _opcheck(run, n, v))
    run_case(run, "ops", f"torch.compile[{run.compile_backend}] partial_attention", torch.float32,
             lambda: _compile_partial(run))
    run_case(run, "ops", f"torch.compile[{run.compile_backend}] cache_write_rows + partial_attention", torch.float32,
             lambda: _compile_write_then_attend(run))


# --------------------------------------------------------------------------- timing


class Timer:
    """Median time of a call, the L2 cache flushed before each repeat; plain wall clock on CPU
    (the smoke run).

    * graph (device time): one CUDA-graph replay, queued behind the flush and a short GPU sleep
      while the GPU is still busy, so no launch latency falls between the two events;
    * eager (latency of one isolated call): the device idle and synchronised before the call,
      so the host-side launch work of every kernel in it is counted.
    """

    HEAD_START_CYCLES = 200_000  # ~0.1 ms of GPU sleep: time for the host to queue the replay

    def __init__(self, run: Run):
        self.run = run
        self.cuda = run.device.type == "cuda"
        # Larger than the H100's 50 MB L2: zeroing it evicts the previous repeat's data.
        self.flush_buf = torch.empty(64 * 2**20, dtype=torch.int32, device=run.device) if self.cuda else None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _samples(self, call, queued: bool = False) -> list[float]:
        out = []
        for _ in range(self.run.reps):
            if self.cuda:
                self.flush_buf.zero_()
                if not queued:
                    torch.cuda.synchronize()
                elif hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(self.HEAD_START_CYCLES)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                out.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                call()
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    def eager(self, fn) -> float:
        for _ in range(self.run.warmup):
            fn()
        self._sync()
        return statistics.median(self._samples(fn))

    def graph(self, fn) -> float:
        """Replay time of a CUDA graph of one call (after ``eager`` has warmed the kernels up)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the warm-up the graph capture docs ask for
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        for _ in range(3):
            g.replay()
        self._sync()
        ms = statistics.median(self._samples(g.replay, queued=True))
        del g
        return ms

    def measure(self, fn) -> dict:
        """{"eager_ms", "ms"}: ``ms`` is the graph replay on CUDA (eager when capture fails, noted)."""
        res = {"eager_ms": self.eager(fn)}
        if not self.cuda:
            res["ms"] = res["eager_ms"]
            return res
        try:
            res["ms"] = self.graph(fn)
        except Exception as exc:  # noqa: BLE001 - fall back to the eager number, say so
            res["ms"], res["graph_error"] = res["eager_ms"], _error_text(exc)["error"]
            torch.cuda.synchronize()
        return res


def time_variants(run: Run, bench: str, params: dict, variants: dict) -> None:
    """Time each variant of one configuration and record the row (errors per variant)."""
    row = {"bench": bench, **params, "ms": {}, "eager_ms": {}, "errors": {}}
    if run.past_deadline():
        row["errors"]["*"] = "skipped: deadline"
        run.record("timings", row)
        _say(f"  skip  {bench} {params} (deadline)")
        return
    timer = Timer(run)
    for name, fn in variants.items():
        try:
            with torch.no_grad():
                res = timer.measure(fn)
            row["ms"][name], row["eager_ms"][name] = res["ms"], res["eager_ms"]
            if "graph_error" in res:
                row["errors"][f"{name} (graph)"] = res["graph_error"]
        except Exception as exc:  # noqa: BLE001 - recorded; the other variants still run
            row["errors"][name] = _error_text(exc)["error"]
            if run.device.type == "cuda":
                torch.cuda.synchronize()
    run.record("timings", row)
    times = ", ".join(f"{k} {v:.4f}" for k, v in row["ms"].items())
    errs = f" errors: {row['errors']}" if row["errors"] else ""
    _say(f"  time  {bench} {params}: {times} ms{errs}")


class Big:
    """Random tensors drawn on the device itself (fast at 8B shapes), seeded."""

    def __init__(self, run: Run, seed: int):
        self.run = run
        self.gen = torch.Generator(device=run.device).manual_seed(seed)

    def randn(self, *shape, scale: float = 1.0, dtype=None) -> torch.Tensor:
        x = torch.randn(shape, generator=self.gen, device=self.run.device, dtype=torch.float32)
        return (scale * x).to(dtype or self.run.time_dtype)

    def rows(self, bsz: int, n: int, seq_len: int) -> torch.Tensor:
        """Sorted (B, n) distinct positions (all positions when n == seq_len)."""
        perm = torch.stack([torch.randperm(seq_len, generator=self.gen, device=self.run.device) for _ in range(bsz)])
        return perm[:, :n].sort(1).values


def _active(run: Run, frac: float) -> int:
    return max(1, round(frac * run.sizes.seq))


def time_partial(run: Run) -> None:
    s, pa = run.sizes, K.partial_attention
    big = Big(run, 1)
    k = big.randn(s.batch, s.kv_heads, s.seq, s.head_dim)
    v = big.randn(s.batch, s.kv_heads, s.seq, s.head_dim)
    q_all = big.randn(s.batch, s.heads, s.seq, s.head_dim)
    gqa = s.heads != s.kv_heads
    for frac in s.fractions:
        n = _active(run, frac)
        rows = big.rows(s.batch, n, s.seq)
        q = K.ops.gather_rows(q_all, rows, 2).contiguous()
        time_variants(run, "partial_attention", {"fraction": frac, "active": n}, {
            "triton": lambda q=q, rows=rows: pa.triton_partial_attention(q, k, v, rows, None, None),
            "torch_ref": lambda q=q, rows=rows: pa.partial_attention_reference(q, k, v, rows, None, None),
            "sdpa_full": lambda: F.scaled_dot_product_attention(q_all, k, v, enable_gqa=gqa),
        })


def time_approx(run: Run) -> None:
    s, aa, pa = run.sizes, K.approx_attention, K.partial_attention
    big = Big(run, 2)
    n_rows, gqa = s.seq, s.heads != s.kv_heads
    q = big.randn(s.batch, s.heads, n_rows, s.head_dim)
    k = big.randn(s.batch, s.kv_heads, n_rows, s.head_dim)
    v = big.randn(s.batch, s.kv_heads, n_rows, s.head_dim)
    cached = big.randn(s.batch, s.heads, n_rows, s.head_dim)
    # Last step's statistics for mode 2 (exact ones; the values do not change the cost).
    every_row = torch.arange(n_rows, device=run.device).expand(s.batch, n_rows)
    _, m_old, l_old = pa.partial_attention_stats_reference(q, k, v, every_row, None, None)
    for frac in s.fractions:
        n = _active(run, frac)
        changed = big.rows(s.batch, n, n_rows)
        dv_rows = big.randn(s.batch, s.kv_heads, n, s.head_dim, scale=0.1)
        sal_ctx = big.randn(s.batch, s.heads, n, s.head_dim)
        k_old = K.ops.gather_rows(k, changed, 2) + big.randn(s.batch, s.kv_heads, n, s.head_dim, scale=0.1)
        args = (q, k, changed, dv_rows, cached, changed, sal_ctx, None, None)
        time_variants(run, "approx_attention", {"fraction": frac, "active": n}, {
            # The launcher's index preparation alone (part of both Triton modes' time).
            "index_prep": lambda changed=changed: (aa.unique_rows(changed, n_rows), aa.salient_slots(changed, n_rows)),
            "triton_mode1": lambda args=args: aa.triton_approx_attention(*args),
            "triton_mode2": lambda args=args, k_old=k_old: aa.triton_approx_attention(*args, k_old, m_old, l_old),
            "torch_ref_mode1": lambda args=args: aa.approx_attention_reference(*args),
            "sdpa_full": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
        })


def time_saliency(run: Run) -> None:
    s, sa = run.sizes, K.saliency
    big = Big(run, 3)
    new = big.randn(s.batch, s.heads, s.seq, s.head_dim)
    cached = (new.float() + big.randn(s.batch, 1, s.seq, 1, dtype=torch.float32) * 0.1
              * big.randn(s.batch, s.heads, s.seq, s.head_dim, dtype=torch.float32)).to(new.dtype)
    time_variants(run, "saliency", {"rows": s.seq, "tau": 0.99}, {
        "triton": lambda: sa.triton_saliency(new, cached, 0.99, 0, s.seq),
        "torch_ref": lambda: sa.saliency_reference(new, cached, 0.99, 0, s.seq),
    })


def time_scatter(run: Run) -> None:
    s, cs = run.sizes, K.cache_scatter
    big = Big(run, 4)
    layouts = {  # name: (cache shape, dim)
        "kv (B,KV,L,d) dim 2": ((s.batch, s.kv_heads, s.seq, s.head_dim), 2),
        "hidden (B,L,D) dim 1": ((s.batch, s.seq, s.d_model), 1),
    }
    for layout, (shape, dim) in layouts.items():
        cache = big.randn(*shape)
        for frac in s.fractions:
            n = _active(run, frac)
            rows = big.rows(s.batch, n, s.seq)
            values = big.randn(*shape[:dim], n, *shape[dim + 1:])
            flat = rows[0]  # batch 1: index_copy_ along the row dim of the single batch element

            time_variants(run, "cache_scatter", {"layout": layout, "fraction": frac, "active": n}, {
                "triton": lambda rows=rows, values=values: cs.triton_cache_write_rows(cache, rows, values, dim),
                "torch_ref": lambda rows=rows, values=values: cs.cache_write_rows_reference(cache, rows, values, dim),
                "index_copy_": lambda flat=flat, values=values: cache[0].index_copy_(dim - 1, flat, values[0]),
            })


def time_mlp(run: Run) -> None:
    s = run.sizes
    big = Big(run, 5)
    w = {"o": big.randn(s.d_model, s.d_model, scale=s.d_model ** -0.5),
         "gate": big.randn(s.hidden, s.d_model, scale=s.d_model ** -0.5),
         "up": big.randn(s.hidden, s.d_model, scale=s.d_model ** -0.5),
         "down": big.randn(s.d_model, s.hidden, scale=s.hidden ** -0.5)}
    fn = _swiglu(w)
    h = big.randn(s.batch, s.seq, s.d_model)
    out = torch.zeros_like(h)
    for frac in s.fractions:
        n = _active(run, frac)
        rows = big.rows(s.batch, n, s.seq)
        time_variants(run, "gathered_mlp", {"fraction": frac, "active": n}, {
            "gathered": lambda rows=rows: K.gathered_mlp.gathered_rows_apply(fn, h, rows, out),
            "dense": lambda: fn(h),
        })


# --------------------------------------------------------------------------- tables


# (bench, title, variants shown, speedups as (numerator, denominator))
TABLES = (
    ("partial_attention", "Partial attention: the active rows' queries over all {seq} keys",
     ("triton", "torch_ref", "sdpa_full"), (("sdpa_full", "triton"), ("torch_ref", "triton"))),
    ("approx_attention",
     "Approximate attention (DyLLM; active = changed = salient rows) vs exact attention of all {seq} rows",
     ("triton_mode1", "triton_mode2", "index_prep", "torch_ref_mode1", "sdpa_full"),
     (("sdpa_full", "triton_mode1"), ("sdpa_full", "triton_mode2"), ("torch_ref_mode1", "triton_mode1"))),
    ("saliency", "Saliency (row cosine over all heads + compaction) of {seq} rows",
     ("triton", "torch_ref"), (("torch_ref", "triton"),)),
    ("cache_scatter", "Cache scatter of the active rows into a {seq}-row cache", ("triton", "torch_ref", "index_copy_"),
     (("torch_ref", "triton"), ("index_copy_", "triton"))),
    ("gathered_mlp", "o_proj + SwiGLU MLP on the active rows (index_select, GEMMs, index_copy_) vs dense",
     ("gathered", "dense"), (("dense", "gathered"),)),
)


def _fmt_ms(x) -> str:
    return "err" if x is None else f"{x:.4f}"


def _param_cells(row: dict) -> list[str]:
    cells = []
    if "layout" in row:
        cells.append(row["layout"])
    if "fraction" in row:
        cells += [f"{100 * row['fraction']:g}%", str(row["active"])]
    if "rows" in row:
        cells += [str(row["rows"]), str(row["tau"])]
    return cells


def _param_header(row: dict) -> list[str]:
    head = ["layout"] if "layout" in row else []
    if "fraction" in row:
        head += ["active", "rows"]
    if "rows" in row:
        head += ["rows", "tau"]
    return head


def timing_tables(results: dict, key: str = "ms") -> str:
    """Markdown tables, one per benchmark: time per variant and the speedups."""
    parts = []
    seq = results["env"]["sizes"]["time"]["seq"]
    for bench, title, variants, speedups in TABLES:
        rows = [r for r in results["timings"] if r["bench"] == bench]
        if not rows:
            continue
        head = _param_header(rows[0]) + [f"{v} ms" for v in variants] + [f"{a}/{b}" for a, b in speedups]
        how = "CUDA graph replay" if key == "ms" else "eager call, launch overhead included"
        lines = [f"**{title.format(seq=seq)}** ({how})",
                 "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            t = r[key]
            cells = _param_cells(r) + [_fmt_ms(t.get(v)) for v in variants]
            cells += [f"{t[a] / t[b]:.2f}x" if t.get(a) and t.get(b) else "-" for a, b in speedups]
            lines.append("| " + " | ".join(cells) + " |")
        errors = [f"{_param_cells(r)} {k}: {v}" for r in rows for k, v in r["errors"].items()]
        parts.append("\n".join(lines + [f"- error {e}" for e in errors]))
    return "\n\n".join(parts)


def check_table(results: dict) -> str:
    head = "| section | case | dtype | max abs err | rel err | tol (atol/rtol) | other outputs | status |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    order = ("cache_scatter", "partial_attn", "saliency", "approx_attn", "gathered_mlp", "ops")
    for c in sorted(results["cases"], key=lambda c: order.index(c["section"]) if c["section"] in order else 99):
        others = ", ".join(f"{o['label']} {o['max_abs_err']:.1e}{'' if o['ok'] else ' FAIL'}"
                           for o in c.get("outputs", [])[1:])
        if c["status"] in ("error", "skipped"):
            others = (c.get("error") or c.get("note", "")).replace("|", "/").replace("\n", " ")[:200]
        err = f"{c['max_abs_err']:.2e}" if "max_abs_err" in c else "-"
        rel = f"{c['rel_err']:.2e}" if "rel_err" in c else "-"
        lines.append(f"| {c['section']} | {c['case']} | {c['dtype']} | {err} | {rel} | {c.get('tol', '-')} | "
                     f"{others} | {c['status'].upper() if c['status'] != 'pass' else 'pass'} |")
    counts = {s: sum(c["status"] == s for c in results["cases"]) for s in ("pass", "fail", "error", "skipped")}
    return "\n".join(lines) + "\n\n" + ", ".join(f"{v} {k}" for k, v in counts.items())


# --------------------------------------------------------------------------- driver


def environment(run: Run) -> dict:
    """Device name and versions, recorded with every result file."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(run.device),
           "smoke": run.smoke, "DYLLM_TRITON": os.environ.get("DYLLM_TRITON"),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
           "cuda_kernels_registered": K.triton.CUDA_KERNELS_ENABLED and K.triton.HAS_TRITON,
           "kernels_dir": str(Path(K.ops.__file__).parent), "transformers_imported": "transformers" in sys.modules}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if run.device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(run.device)
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or platform.machine()
    env["sizes"] = {"check": vars(run.check), "time": vars(run.sizes), "time_dtype": _short(run.time_dtype),
                    "half": _short(run.half), "warmup": run.warmup, "reps": run.reps}
    return env


SECTION_FNS = {
    "check_scatter": check_scatter, "check_partial": check_partial, "check_saliency": check_saliency,
    "check_approx": check_approx, "check_mlp": check_mlp, "check_ops": check_ops,
    "time_partial": time_partial, "time_approx": time_approx, "time_saliency": time_saliency,
    "time_scatter": time_scatter, "time_mlp": time_mlp,
}


def run_section(run: Run, section: str) -> None:
    """One section in this process; anything that escapes a case is recorded as a section error."""
    _say(f"== {section} ({'smoke, ' if run.smoke else ''}{run.device})")
    t0 = time.perf_counter()
    try:
        SECTION_FNS[section](run)
    except Exception as exc:  # noqa: BLE001 - recorded; the next section runs
        run.record("errors", {"section": section, **_error_text(exc)})
        _say(f"  ERROR in {section}: {exc}")
    _say(f"== {section} done in {time.perf_counter() - t0:.1f}s")


def _text(out) -> str:
    """A child's captured output as text (bytes or str or None, depending on how it ended)."""
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _read_part(path: Path, section: str) -> dict:
    """The results a child left on disk (none if it died before writing any)."""
    empty = {"cases": [], "timings": [], "errors": []}
    try:
        return json.loads(path.read_text()) if path.is_file() else empty
    except (OSError, ValueError) as exc:
        return dict(empty, errors=[{"section": section, "error": f"unreadable results: {exc}", "traceback": ""}])


def run_isolated(args, section: str, deadline: float) -> dict:
    """One section in a child process of this script; its results, or the way it died."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--part-json", str(part),
               "--deadline-at", str(deadline), "--warmup", str(args.warmup), "--reps", str(args.reps),
               "--compile-backend", args.compile_backend] + (["--smoke"] if args.smoke else [])
        died = None
        try:
            limit = max(20.0, deadline - time.time() + 20)  # well past the deadline: the child is stuck
            proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=limit)
            if proc.returncode not in (0, 1):
                died = {"section": section, "error": f"child exited with {proc.returncode}",
                        "traceback": proc.stderr[-3000:]}
        except subprocess.TimeoutExpired as exc:
            died = {"section": section, "error": f"child killed after {exc.timeout:.0f}s (deadline)",
                    "traceback": _text(exc.stderr)[-3000:]}
        results = _read_part(part, section)
    if died:
        results["errors"].append(died)
        _say(f"  ERROR {section}: {died['error']}\n{died['traceback'][-1500:]}")
    return results


def make_run(args) -> Run:
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (tiny shapes, CPU, Triton interpreter) or on a GPU")
    device = torch.device("cpu" if smoke else "cuda")
    if not smoke:  # exact fp32 matmuls in the references (the ground truth of the fp32 checks)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return Run(
        device=device, smoke=smoke, half=torch.float16 if smoke else torch.bfloat16,
        time_dtype=torch.float32 if smoke else torch.bfloat16, check=SMOKE_CHECK if smoke else GPU_CHECK,
        sizes=SMOKE_TIME if smoke else GPU_TIME, warmup=args.warmup, reps=args.reps,
        deadline=args.deadline_at, compile_backend=args.compile_backend,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="compare the Triton kernels with their references")
    p.add_argument("--time", action="store_true", help="time the kernels at LLaDA-8B shapes")
    p.add_argument("--all", action="store_true", help="--check and --time")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--json", type=Path, help="write every number here (rewritten after each section)")
    p.add_argument("--warmup", type=int, default=None, help="calls before timing (default 10; smoke 1)")
    p.add_argument("--reps", type=int, default=None, help="timed calls, median reported (default 50; smoke 2)")
    p.add_argument("--deadline-s", type=float, default=540.0, help="skip what is left after this many seconds")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per section (default: on CUDA yes, with --smoke no)")
    p.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    p.add_argument("--only", nargs="*", choices=sorted(SECTION_FNS), help="run only these sections")
    # Internal: how the parent runs one section in a child.
    p.add_argument("--section", choices=sorted(SECTION_FNS), help=argparse.SUPPRESS)
    p.add_argument("--part-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    args.reps = args.reps if args.reps is not None else (2 if args.smoke else 50)
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    args.deadline_at = args.deadline_at or time.time() + args.deadline_s
    if args.isolate is None:
        args.isolate = not args.smoke
    if not (args.check or args.time or args.all or args.section or args.only):
        p.error("say what to run: --check, --time or --all (add --smoke on a machine without a GPU)")
    return args


def child_main(args) -> int:
    """Run one section and keep its partial results on disk after every case."""
    run = make_run(args)

    def write():  # atomically, so a child killed mid-write leaves the previous version
        tmp = args.part_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(run.results, default=str))
        os.replace(tmp, args.part_json)

    run.on_record = write
    write()
    run_section(run, args.section)
    write()
    return 0


# The two compile-heavy checks (dozens of kernel specialisations, ~2 min each on an H100 box) run
# last, so that a slow machine that reaches the deadline loses check cases, not the timings.
SLOW_CHECKS = ("check_partial", "check_approx")


def sections_to_run(args) -> list[str]:
    if args.only:
        return list(args.only)
    want_checks, want_times = args.check or args.all, args.time or args.all
    fast = [s for s in CHECK_SECTIONS if s not in SLOW_CHECKS] if want_checks else []
    return fast + list(TIME_SECTIONS if want_times else ()) + (list(SLOW_CHECKS) if want_checks else [])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        return child_main(args)
    run = make_run(args)
    report = {"env": environment(run), "cases": [], "timings": [], "errors": []}
    _say(f"dyllm-fx kernels on {report['env']['device_name']} (torch {report['env']['torch']}, "
         f"triton {report['env']['triton']}, DYLLM_TRITON={report['env']['DYLLM_TRITON']}, "
         f"isolate={args.isolate})")
    for section in sections_to_run(args):
        if args.isolate:
            part = run_isolated(args, section, args.deadline_at)
        else:
            run.results = {"cases": [], "timings": [], "errors": []}
            run_section(run, section)
            part = run.results
        for key in ("cases", "timings", "errors"):
            report[key] += part[key]
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    bad = report["errors"] or any(c["status"] in ("fail", "error") for c in report["cases"])
    bad = bad or any(r["errors"] for r in report["timings"])
    return 1 if bad else 0


def print_report(report: dict) -> None:
    env = report["env"]
    _say(f"\n## Kernels on {env['device_name']}\n\ntorch {env['torch']}, triton {env['triton']}, "
         f"CUDA {env.get('cuda')}, DYLLM_TRITON={env['DYLLM_TRITON']}"
         f"{', SMOKE (timings meaningless)' if env['smoke'] else ''}\n")
    if report["cases"]:
        _say("### Correctness (Triton vs reference)\n\n" + check_table(report) + "\n")
    if report["timings"]:
        s = env["sizes"]["time"]
        _say(f"### Timings (batch {s['batch']}, seq {s['seq']}, {s['heads']} heads x {s['head_dim']}, "
             f"{s['kv_heads']} KV heads, d_model {s['d_model']}, MLP {s['hidden']}, {env['sizes']['time_dtype']}; "
             f"median of {env['sizes']['reps']} after {env['sizes']['warmup']} warm-up calls, L2 flushed)\n")
        _say(timing_tables(report, "ms") + "\n")
        if not env["smoke"]:  # on CPU both numbers are the same wall-clock time
            _say("#### Eager calls\n\n" + timing_tables(report, "eager_ms") + "\n")
    for e in report["errors"]:
        _say(f"- section error {e['section']}: {e['error']}")


if __name__ == "__main__":
    sys.exit(main())
