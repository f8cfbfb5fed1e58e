"""Time the Triton kernels at LLaDA-8B layer shapes on a GPU, against what the dense model pays.

    python benchmarks/kernels_timing.py --json out.json     # every table, every number as JSON
    python benchmarks/kernels_timing.py --smoke             # tiny shapes on CPU, Triton interpreter

Their correctness is checked by the tests, on the same inputs and references as on the CPU:
``pytest -m cuda`` (tests/test_kernels.py). The GPU check is therefore

    pytest -m cuda tests && python benchmarks/kernels_timing.py --json out.json

What it measures (B 1, seq 1024, 32 heads of 128, 32 KV heads, d_model 4096, MLP 12288, bf16;
active fractions 5 / 10 / 25 / 100 %): partial attention, approximate attention (mode 1 and 2),
cache scatter and the gathered SwiGLU MLP + o_proj (no kernel of its own: the product path's
row gather, the GEMMs and the row write), each against what the dense model pays. Two numbers
per variant: ``ms`` is the replay time of a CUDA graph of one call, queued while the GPU is
still busy (the device time, no launch latency in it); ``eager ms`` is one eager call on an
idle, synchronised device (the host-side launch work of each kernel included). Both are
medians over ``--reps`` after ``--warmup`` calls, the L2 cache flushed before each. The
approximate-attention table also times ``index_prep``, the launcher's row-list preparation
(``unique_rows`` + ``salient_slots``), which both Triton modes include.

On CUDA every section runs in its own subprocess (``--no-isolate`` to turn it off), so that a
CUDA fault that poisons a process's context costs only its section; a soft deadline
(``--deadline-s``) skips what is left rather than overrun. Results are written to ``--json``
after every section. DYLLM_TRITON=1 (the CUDA registration of the kernels) and, with
``--smoke``, TRITON_INTERPRET=1 are set here before anything imports Triton.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path


def _prepare_environment(argv: list[str]) -> None:
    """Set the variables Triton and dyllm_fx read at import time, before either is imported."""
    if "--smoke" in argv:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors
    os.environ.setdefault("DYLLM_TRITON", "1")  # register the Triton kernels for CUDA tensors


_prepare_environment(sys.argv[1:])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# The installed package; importing dyllm_fx.kernels loads no model code (the package is lazy).
from dyllm_fx.kernels import _triton  # noqa: E402
from dyllm_fx.kernels import approx_attention as aa  # noqa: E402
from dyllm_fx.kernels import cache_scatter as cs  # noqa: E402
from dyllm_fx.kernels import partial_attention as pa  # noqa: E402
from dyllm_fx.kernels.dispatch import cache_write_rows, gather_rows  # noqa: E402

TIME_SECTIONS = ("time_partial", "time_approx", "time_scatter", "time_mlp")


# --------------------------------------------------------------------------- settings


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


GPU_TIME = TimeSizes()
SMOKE_TIME = TimeSizes(seq=16, heads=2, kv_heads=2, head_dim=16, d_model=32, hidden=96, fractions=(0.1, 1.0))


@dataclass
class Run:
    """What one section needs: device, dtype, sizes, timing settings, the deadline and the results."""

    device: torch.device
    smoke: bool
    time_dtype: torch.dtype
    sizes: TimeSizes
    warmup: int
    reps: int
    deadline: float  # time.time() after which the remaining timings are skipped
    results: dict = field(default_factory=lambda: {"timings": [], "errors": []})
    on_record: object = None  # called after each recorded timing (writes the partial JSON)

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


# --------------------------------------------------------------------------- timing


def _swiglu(w: dict):
    """o_proj then a SwiGLU MLP, as one row-wise function (the shape of a LLaDA layer's tail)."""

    def fn(x):
        y = F.linear(x, w["o"])
        return F.linear(F.silu(F.linear(y, w["gate"])) * F.linear(y, w["up"]), w["down"])

    return fn


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
        perm = torch.stack(
            [torch.randperm(seq_len, generator=self.gen, device=self.run.device) for _ in range(bsz)]
        )
        return perm[:, :n].sort(1).values


def _active(run: Run, frac: float) -> int:
    return max(1, round(frac * run.sizes.seq))


def time_partial(run: Run) -> None:
    s = run.sizes
    big = Big(run, 1)
    k = big.randn(s.batch, s.kv_heads, s.seq, s.head_dim)
    v = big.randn(s.batch, s.kv_heads, s.seq, s.head_dim)
    q_all = big.randn(s.batch, s.heads, s.seq, s.head_dim)
    gqa = s.heads != s.kv_heads
    for frac in s.fractions:
        n = _active(run, frac)
        rows = big.rows(s.batch, n, s.seq)
        q = gather_rows(q_all, rows, 2).contiguous()
        time_variants(
            run,
            "partial_attention",
            {"fraction": frac, "active": n},
            {
                "triton": lambda q=q, rows=rows: pa.triton_partial_attention(q, k, v, rows, None, None),
                "torch_ref": lambda q=q, rows=rows: pa.partial_attention_reference(q, k, v, rows, None, None),
                "sdpa_full": lambda: F.scaled_dot_product_attention(q_all, k, v, enable_gqa=gqa),
            },
        )


def time_approx(run: Run) -> None:
    s = run.sizes
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
        k_old = gather_rows(k, changed, 2) + big.randn(s.batch, s.kv_heads, n, s.head_dim, scale=0.1)
        args = (q, k, changed, dv_rows, cached, changed, sal_ctx, None, None)
        time_variants(
            run,
            "approx_attention",
            {"fraction": frac, "active": n},
            {
                # The launcher's index preparation alone (part of both Triton modes' time).
                "index_prep": lambda changed=changed: (
                    aa.unique_rows(changed, n_rows),
                    aa.salient_slots(changed, n_rows),
                ),
                "triton_mode1": lambda args=args: aa.triton_approx_attention(*args),
                "triton_mode2": lambda args=args, k_old=k_old: aa.triton_approx_attention(
                    *args, k_old, m_old, l_old
                ),
                "torch_ref_mode1": lambda args=args: aa.approx_attention_reference(*args),
                "sdpa_full": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
            },
        )


def time_scatter(run: Run) -> None:
    s = run.sizes
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
            values = big.randn(*shape[:dim], n, *shape[dim + 1 :])
            flat = rows[0]  # batch 1: index_copy_ along the row dim of the single batch element

            time_variants(
                run,
                "cache_scatter",
                {"layout": layout, "fraction": frac, "active": n},
                {
                    "triton": lambda rows=rows, values=values: cs.triton_cache_write_rows(
                        cache, rows, values, dim
                    ),
                    "torch_ref": lambda rows=rows, values=values: cs.cache_write_rows_reference(
                        cache, rows, values, dim
                    ),
                    "index_copy_": lambda flat=flat, values=values: cache[0].index_copy_(
                        dim - 1, flat, values[0]
                    ),
                },
            )


def time_mlp(run: Run) -> None:
    s = run.sizes
    big = Big(run, 5)
    w = {
        "o": big.randn(s.d_model, s.d_model, scale=s.d_model**-0.5),
        "gate": big.randn(s.hidden, s.d_model, scale=s.d_model**-0.5),
        "up": big.randn(s.hidden, s.d_model, scale=s.d_model**-0.5),
        "down": big.randn(s.d_model, s.hidden, scale=s.hidden**-0.5),
    }
    fn = _swiglu(w)
    h = big.randn(s.batch, s.seq, s.d_model)
    out = torch.zeros_like(h)
    for frac in s.fractions:
        n = _active(run, frac)
        rows = big.rows(s.batch, n, s.seq)
        time_variants(
            run,
            "gathered_mlp",
            {"fraction": frac, "active": n},
            {
                "gathered": lambda rows=rows: cache_write_rows(out, rows, fn(gather_rows(h, rows, 1)), 1),
                "dense": lambda: fn(h),
            },
        )


# --------------------------------------------------------------------------- tables


# (bench, title, variants shown, speedups as (numerator, denominator))
TABLES = (
    (
        "partial_attention",
        "Partial attention: the active rows' queries over all {seq} keys",
        ("triton", "torch_ref", "sdpa_full"),
        (("sdpa_full", "triton"), ("torch_ref", "triton")),
    ),
    (
        "approx_attention",
        "Approximate attention (DyLLM; active = changed = salient rows) vs exact attention of all {seq} rows",
        ("triton_mode1", "triton_mode2", "index_prep", "torch_ref_mode1", "sdpa_full"),
        (("sdpa_full", "triton_mode1"), ("sdpa_full", "triton_mode2"), ("torch_ref_mode1", "triton_mode1")),
    ),
    (
        "cache_scatter",
        "Cache scatter of the active rows into a {seq}-row cache",
        ("triton", "torch_ref", "index_copy_"),
        (("torch_ref", "triton"), ("index_copy_", "triton")),
    ),
    (
        "gathered_mlp",
        "o_proj + SwiGLU MLP on the active rows (gather_rows, GEMMs, cache_write_rows) vs dense",
        ("gathered", "dense"),
        (("dense", "gathered"),),
    ),
)


def _fmt_ms(x) -> str:
    return "err" if x is None else f"{x:.4f}"


def _param_cells(row: dict) -> list[str]:
    cells = []
    if "layout" in row:
        cells.append(row["layout"])
    if "fraction" in row:
        cells += [f"{100 * row['fraction']:g}%", str(row["active"])]
    return cells


def _param_header(row: dict) -> list[str]:
    head = ["layout"] if "layout" in row else []
    if "fraction" in row:
        head += ["active", "rows"]
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
        lines = [
            f"**{title.format(seq=seq)}** ({how})",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for r in rows:
            t = r[key]
            cells = _param_cells(r) + [_fmt_ms(t.get(v)) for v in variants]
            cells += [f"{t[a] / t[b]:.2f}x" if t.get(a) and t.get(b) else "-" for a, b in speedups]
            lines.append("| " + " | ".join(cells) + " |")
        errors = [f"{_param_cells(r)} {k}: {v}" for r in rows for k, v in r["errors"].items()]
        parts.append("\n".join(lines + [f"- error {e}" for e in errors]))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- driver


def environment(run: Run) -> dict:
    """Device name and versions, recorded with every result file."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(run.device),
        "smoke": run.smoke,
        "DYLLM_TRITON": os.environ.get("DYLLM_TRITON"),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "cuda_kernels_registered": _triton.CUDA_KERNELS_ENABLED and _triton.HAS_TRITON,
        "kernels_dir": str(Path(cs.__file__).parent),
        "transformers_imported": "transformers" in sys.modules,
    }
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
    env["sizes"] = {
        "time": vars(run.sizes),
        "time_dtype": _short(run.time_dtype),
        "warmup": run.warmup,
        "reps": run.reps,
    }
    return env


SECTION_FNS = {
    "time_partial": time_partial,
    "time_approx": time_approx,
    "time_scatter": time_scatter,
    "time_mlp": time_mlp,
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
    empty = {"timings": [], "errors": []}
    try:
        return json.loads(path.read_text()) if path.is_file() else empty
    except (OSError, ValueError) as exc:
        return dict(
            empty, errors=[{"section": section, "error": f"unreadable results: {exc}", "traceback": ""}]
        )


def run_isolated(args, section: str, deadline: float) -> dict:
    """One section in a child process of this script; its results, or the way it died."""
    with tempfile.TemporaryDirectory() as tmp:
        part = Path(tmp) / "part.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--section",
            section,
            "--part-json",
            str(part),
            "--deadline-at",
            str(deadline),
            "--warmup",
            str(args.warmup),
            "--reps",
            str(args.reps),
        ]
        cmd += ["--smoke"] if args.smoke else []
        died = None
        try:
            limit = max(20.0, deadline - time.time() + 20)  # well past the deadline: the child is stuck
            proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=limit)
            if proc.returncode not in (0, 1):
                died = {
                    "section": section,
                    "error": f"child exited with {proc.returncode}",
                    "traceback": proc.stderr[-3000:],
                }
        except subprocess.TimeoutExpired as exc:
            died = {
                "section": section,
                "error": f"child killed after {exc.timeout:.0f}s (deadline)",
                "traceback": _text(exc.stderr)[-3000:],
            }
        results = _read_part(part, section)
    if died:
        results["errors"].append(died)
        _say(f"  ERROR {section}: {died['error']}\n{died['traceback'][-1500:]}")
    return results


def make_run(args) -> Run:
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit(
            "no CUDA device: run with --smoke (tiny shapes, CPU, Triton interpreter) or on a GPU"
        )
    return Run(
        device=torch.device("cpu" if smoke else "cuda"),
        smoke=smoke,
        time_dtype=torch.float32 if smoke else torch.bfloat16,
        sizes=SMOKE_TIME if smoke else GPU_TIME,
        warmup=args.warmup,
        reps=args.reps,
        deadline=args.deadline_at,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--json", type=Path, help="write every number here (rewritten after each section)")
    p.add_argument("--warmup", type=int, default=None, help="calls before timing (default 10; smoke 1)")
    p.add_argument(
        "--reps", type=int, default=None, help="timed calls, median reported (default 50; smoke 2)"
    )
    p.add_argument(
        "--deadline-s", type=float, default=540.0, help="skip what is left after this many seconds"
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one subprocess per section (default: on CUDA yes, with --smoke no)",
    )
    p.add_argument("--only", nargs="*", choices=sorted(SECTION_FNS), help="run only these sections")
    # Internal: how the parent runs one section in a child.
    p.add_argument("--section", choices=sorted(SECTION_FNS), help=argparse.SUPPRESS)
    p.add_argument("--part-json", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)
    args.reps = args.reps if args.reps is not None else (2 if args.smoke else 50)
    args.deadline_at = args.deadline_at or time.time() + args.deadline_s
    if args.isolate is None:
        args.isolate = not args.smoke
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


def sections_to_run(args) -> list[str]:
    return list(args.only) if args.only else list(TIME_SECTIONS)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        return child_main(args)
    run = make_run(args)
    report = {"env": environment(run), "timings": [], "errors": []}
    _say(
        f"dyllm-fx kernels on {report['env']['device_name']} (torch {report['env']['torch']}, "
        f"triton {report['env']['triton']}, DYLLM_TRITON={report['env']['DYLLM_TRITON']}, "
        f"isolate={args.isolate})"
    )
    for section in sections_to_run(args):
        if args.isolate:
            part = run_isolated(args, section, args.deadline_at)
        else:
            run.results = {"timings": [], "errors": []}
            run_section(run, section)
            part = run.results
        for key in ("timings", "errors"):
            report[key] += part[key]
        if args.json:
            args.json.write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    bad = report["errors"] or any(r["errors"] for r in report["timings"])
    return 1 if bad else 0


def print_report(report: dict) -> None:
    env = report["env"]
    _say(
        f"\n## Kernels on {env['device_name']}\n\ntorch {env['torch']}, triton {env['triton']}, "
        f"CUDA {env.get('cuda')}, DYLLM_TRITON={env['DYLLM_TRITON']}"
        f"{', SMOKE (timings meaningless)' if env['smoke'] else ''}\n"
    )
    if report["timings"]:
        s = env["sizes"]["time"]
        _say(
            f"### Timings (batch {s['batch']}, seq {s['seq']}, {s['heads']} heads x {s['head_dim']}, "
            f"{s['kv_heads']} KV heads, d_model {s['d_model']}, MLP {s['hidden']}, "
            f"{env['sizes']['time_dtype']}; "
            f"median of {env['sizes']['reps']} after {env['sizes']['warmup']} warm-up calls, L2 flushed)\n"
        )
        _say(timing_tables(report, "ms") + "\n")
        if not env["smoke"]:  # on CPU both numbers are the same wall-clock time
            _say("#### Eager calls\n\n" + timing_tables(report, "eager_ms") + "\n")
    for e in report["errors"]:
        _say(f"- section error {e['section']}: {e['error']}")


if __name__ == "__main__":
    sys.exit(main())
