"""Measured speed, memory and accuracy of sparse attention patterns against dense, as one tidy table.

``nsa-viz bench`` answers "what do I gain, what do I lose, on my hardware and my data?". For a list
of patterns (dense is always measured too, as the baseline) and lengths it records:

* kernel level: attention time of the forward, forward+backward and one decode step, and the peak
  memory of each: dense through SDPA beside our kernels (``nsa_viz.attention.run_pattern``);
* model level: prefill and generation throughput (tokens/s), peak memory and, on a GPU, the largest
  batch that fits at a length, with the pattern applied to every layer of a real model;
* accuracy against dense: perplexity delta, KL, top-1 agreement and passkey accuracy
  (``nsa_viz.accuracy``).

Every row carries the device, versions, shapes and a ``run_id``; ratios against dense are columns,
computed against the dense baseline of the *same* run and shape. A configuration that fails (out of
memory, unsupported) becomes a row with its status and note, and the run goes on. Rows go to a table
under a results folder (JSON, CSV or Parquet) that successive runs append to; the figures in
``nsa_viz.plots_tradeoffs`` draw that table and compute nothing.

The measurement primitives (``environment``, ``measure_time``/``bench_ms``, ``peak_memory``/``peak_mb``,
``write_rows``) are shared with the scripts under ``benchmarks/``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from .patterns import NSA, BlockSparse, Custom, Dense, Dilated, GlobalLocal, Pattern, SlidingWindow

# --------------------------------------------------------------------------- the table's schema
# Column -> meaning. Every row has every column (None where it does not apply), so a CSV, a JSON
# list and a DataFrame of the same rows agree, and rows of different runs concatenate.
SCHEMA = {
    # what ran where
    "run_id": "one id per `nsa-viz bench` call: ratios only ever compare rows of one run",
    "date": "ISO date of the run", "time": "UTC time the row was measured",
    "device": "device name: the GPU model, or 'cpu: <model> (<n> threads)'", "device_type": "cuda | cpu",
    "torch": "torch version", "triton": "triton version (None if absent)", "transformers": "transformers version",
    "python": "python version", "mode": "quick | full | custom",
    "load_avg": "the machine's 1-minute load average when the run started: above its core count, other "
                "processes were slowing the timings down",
    # what was measured
    "level": "kernel (attention op alone) | model (whole model with the pattern in every layer)",
    "op": "pattern family: dense | sliding_window | global_local | dilated | nsa | custom | block_sparse",
    "impl": "sdpa (dense kernel baseline) | hf (the model's own attention, dense model baseline) | nsa_viz",
    "backend": "what ran the attention: sdpa | hf | triton | reference",
    "pattern": "pattern label", "params": "pattern parameters (dict)",
    "is_baseline": "True on the dense rows every ratio divides by",
    "model": "model name (model level)", "dataset": "text the accuracy was measured on",
    "B": "batch size", "T": "sequence length (prefill, fwd, accuracy) or KV-cache length (decode)",
    "HQ": "query heads", "HKV": "key/value heads", "D": "head dim", "dtype": "tensor dtype",
    "pass": "fwd | fwd_bwd | decode (kernel); prefill | generate | max_batch | accuracy | passkey (model)",
    "new_tokens": "tokens generated per sequence (generate)",
    # measurements
    "ms": "median milliseconds per call (after warm-up, device synchronised); generate: per decode step",
    "ms_p20": "20th percentile ms", "ms_p80": "80th percentile ms", "repeats": "timed repeats",
    "tokens_per_s": "throughput: B*T / prefill time, or B / decode-step time",
    "peak_mem_mb": "peak memory during one call: CUDA max_memory_allocated, or the CPU process's peak RSS (mem_kind)",
    "mem_delta_mb": "peak minus what was in use just before the call: what the call itself added",
    "mem_kind": "cuda_max_allocated | cpu_process_peak_rss",
    "max_batch": "largest batch whose prefill (model, KV cache kept) fits in GPU memory (the note gives the "
                 "bracket and the probes; peak_mem_mb is that batch's peak)",
    "density": "fraction of the causal (query, key) area the pattern attends to (NSA: upper bound)",
    "ppl": "perplexity", "ppl_delta": "perplexity minus dense perplexity on the same tokens",
    "kl": "mean KL(dense || pattern) of next-token distributions, nats",
    "top1_agree": "fraction of positions where the pattern's top-1 token equals dense's",
    "passkey_acc": "fraction of passkey prompts answered exactly", "n_eval": "tokens or prompts evaluated",
    "status": "ok | oom | unsupported | failed | skipped (not measured: the run's time budget was spent)",
    "note": "why a row failed, or what to know about it",
    # derived by add_derived: a legend label, and columns against the dense baseline of the same run and shape
    "label": "short label for legends: 'dense (<impl>)', or op(parameters that differ from the defaults)",
    "speedup_vs_dense": "dense ms / ms, or tokens_per_s / dense tokens_per_s: > 1 means faster than dense",
    "mem_vs_dense": "peak_mem_mb / dense peak_mem_mb", "max_batch_vs_dense": "max_batch / dense max_batch",
    "crossover_T": "smallest length from which this series beats dense at every larger measured length "
                   "(log-interpolated; None if it never does)",
    "pareto": "accuracy rows: True if no other pattern of the group is at most as dense and at least as accurate",
}
COLUMNS = list(SCHEMA)
STATUSES = ("ok", "oom", "unsupported", "failed", "skipped")
KERNEL_PASSES = ("fwd", "fwd_bwd", "decode")
SPEED_PASSES = ("fwd", "fwd_bwd", "decode", "prefill", "generate")
FORMATS = ("json", "csv", "parquet")
_MEASURED = ("ms", "ms_p20", "ms_p80", "repeats", "tokens_per_s", "peak_mem_mb", "mem_delta_mb", "mem_kind", "max_batch")


# --------------------------------------------------------------------------- environment
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or broken at import: the row says None rather than failing
        return None


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when available, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:n]', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    return dev


def environment(device=None) -> dict:
    """Where a measurement was taken: device name and type, versions, date."""
    dev = resolve_device(device)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"cpu: {_cpu_name()} ({torch.get_num_threads()} threads)")
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"device": name, "device_type": dev.type, "torch": torch.__version__, "triton": _version("triton"),
            "transformers": _version("transformers"), "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "load_avg": load}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()  # a failed attempt's tensors live on in its traceback's frames until collected
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- timing
class Timing(NamedTuple):
    ms: float
    p20: float
    p80: float
    repeats: int


class Trial(NamedTuple):
    """One thing to time: ``fn()`` is timed (or, ``self_timed``, returns its own elapsed milliseconds,
    e.g. decode steps after an untimed prefill); ``context()`` is entered around every call, untimed
    (e.g. switching a model to a pattern)."""
    fn: Callable[[], object]
    context: Optional[Callable[[], contextlib.AbstractContextManager]] = None
    self_timed: bool = False


def _entered(trial: Trial):
    return trial.context() if trial.context else contextlib.nullcontext()


def _call_ms(trial: Trial, device) -> float:
    with _entered(trial):
        synchronize(device)
        t0 = time.perf_counter()
        res = trial.fn()
        synchronize(device)
        elapsed = (time.perf_counter() - t0) * 1e3
    return float(res) if trial.self_timed else elapsed


def _timing(times: List[float]) -> Timing:
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else times * 4
    return Timing(statistics.median(times), q[0], q[3], len(times))


def _do_bench(fn, warmup_ms: float, rep_ms: float) -> Timing:
    """CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls)."""
    import triton.testing
    fn()  # compile / autotune outside the estimate do_bench makes from its first calls
    p20, p50, p80 = triton.testing.do_bench(fn, warmup=max(1, int(warmup_ms)), rep=max(1, int(rep_ms)),
                                            quantiles=[0.2, 0.5, 0.8])
    return Timing(float(p50), float(p20), float(p80), max(1, int(rep_ms / max(p50, 1e-3))))


def measure_many(trials: dict, device=None, *, warmup_ms: float = 100.0, rep_ms: float = 400.0,
                 min_repeats: int = 3, max_repeats: int = 1000) -> dict:
    """``{name: Timing, or the exception the trial raised}``: median and 20/80th percentiles in ms.

    Every trial is warmed up (at least one call, then for ``warmup_ms``) and timed over about ``rep_ms``
    (at least ``min_repeats`` calls). On CUDA, plain trials go through ``triton.testing.do_bench`` one
    after the other. Elsewhere, and for self-timed trials, the timed calls are interleaved round by
    round across trials, so that a neighbour's load on a shared machine slows dense and sparse alike
    instead of biasing their ratio.
    """
    dev = resolve_device(device)
    use_do_bench = dev.type == "cuda" and _version("triton") is not None
    results, quota = {}, {}
    for name, trial in trials.items():
        try:
            if use_do_bench and not trial.self_timed:
                with _entered(trial):
                    results[name] = _do_bench(trial.fn, warmup_ms, rep_ms)
                continue
            first = spent = _call_ms(trial, dev)
            while spent < warmup_ms:
                spent += _call_ms(trial, dev)
            quota[name] = int(min(max_repeats, max(min_repeats, rep_ms // max(first, 1e-3))))
        except Exception as exc:  # noqa: BLE001 - the caller records it as this trial's failure
            results[name] = exc
            free_memory()
    times = {name: [] for name in quota}
    for r in range(max(quota.values(), default=0)):
        for name, n in quota.items():
            if r < n and name not in results:
                try:
                    times[name].append(_call_ms(trials[name], dev))
                except Exception as exc:  # noqa: BLE001
                    results[name] = exc
                    free_memory()
    for name, ts in times.items():
        results.setdefault(name, _timing(ts) if ts else RuntimeError("no timed call"))
    return {name: results[name] for name in trials}


def measure_time(fn: Callable[[], object], device=None, **kwargs) -> Timing:
    """Median (and 20/80th percentiles) of ``fn()`` in ms, after warm-up, synchronised (``measure_many``)."""
    res = measure_many({"fn": Trial(fn)}, device, **kwargs)["fn"]
    if isinstance(res, BaseException):
        raise res
    return res


def bench_ms(fn: Callable[[], object], warmup_ms: int = 100, rep_ms: int = 400, device=None) -> float:
    """Median milliseconds of ``fn()`` after warm-up (see ``measure_many``)."""
    return measure_time(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms).ms


# --------------------------------------------------------------------------- memory
class Memory(NamedTuple):
    peak_mb: float
    delta_mb: float
    kind: str


def _status_mb(field: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory(fn: Callable[[], object], device=None) -> Memory:
    """Peak memory while ``fn()`` runs once.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors, not the caching allocator's reserve).
    CPU: the *process's* peak resident set (Linux VmHWM, reset before the call by writing 5 to
    ``/proc/self/clear_refs``; elsewhere the lifetime peak), so it includes the interpreter, torch
    and any loaded model; ``delta_mb`` is what the call added over what was resident before it.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        gc.collect()  # tensors held only by reference cycles would count as "before"
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        return Memory(peak / 2**20, (peak - before) / 2**20, "cuda_max_allocated")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    before = _status_mb("VmRSS")
    fn()
    peak = _status_mb("VmHWM") if reset else None
    if peak is None:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return Memory(peak, max(0.0, peak - (before or peak)), "cpu_process_peak_rss")


def peak_mb(fn: Callable[[], object], device=None) -> float:
    """Peak memory in MB of one call of ``fn`` (see ``peak_memory``)."""
    return peak_memory(fn, device).peak_mb


# --------------------------------------------------------------------------- rows on disk
def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        try:
            value = value.item()
        except (ValueError, RuntimeError, TypeError):
            pass
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    try:
        if value != value:  # pandas NA / NaT
            return None
    except (TypeError, ValueError):
        pass
    return str(value)


def write_rows(rows: list, path) -> Path:
    """Write ``rows`` (a list of dicts) as a JSON list to ``path``, replacing it; also to ``$OUT`` when
    that is set (the GPU machine hands back what is written there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([_jsonable(r) for r in rows], indent=1)
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["OUT"], path.name).write_text(text)
    return path


def _format_of(path: Path) -> str:
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"results file must end in one of {tuple('.' + f for f in FORMATS)}, got {str(path)!r}")
    return fmt


def _frame(rows):
    """A DataFrame of ``rows`` (dicts or a DataFrame) with every schema column, schema columns first."""
    import pandas as pd
    df = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    return df.reindex(columns=COLUMNS + [c for c in df.columns if c not in SCHEMA])


def _to_records(df) -> List[dict]:
    return [{k: _jsonable(v) for k, v in r.items()} for r in _frame(df).to_dict("records")]


def append_rows(rows: Sequence[dict], path) -> Path:
    """Add ``rows`` to the table at ``path`` (``.json`` list, ``.csv`` or ``.parquet``), creating it.

    Rows of other runs are kept as they are; rows already there with a ``run_id`` of ``rows`` are
    replaced, so a run can save its rows as it goes and a second save does not duplicate them.
    ``params`` is stored as a JSON string in CSV/Parquet so that the file round-trips through ``read_table``.
    """
    path = Path(path)
    fmt = _format_of(path)
    new = _to_records(rows)
    runs = {r["run_id"] for r in new}
    old = [r for r in _to_records(read_table(path)) if r["run_id"] not in runs] if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a crash never loses earlier runs
    if fmt == "json":
        tmp.write_text(json.dumps(old + new, indent=1))
    else:
        df = _frame(old + new).astype(object)
        df["params"] = [json.dumps(p) if isinstance(p, dict) else p for p in df["params"]]
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:  # parquet wants one type per column: a column holding any text is stored as text
            for c in df.columns:
                if df[c].map(lambda x: isinstance(x, str)).any():
                    df[c] = df[c].map(lambda x: None if x is None else str(x))
            df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def read_table(path):
    """The table at ``path`` as a DataFrame with every schema column: a ``.json``/``.csv``/``.parquet``
    file, or a folder (every ``tradeoffs*`` table in it, concatenated)."""
    import pandas as pd
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.startswith("tradeoffs") and p.suffix.lstrip(".") in FORMATS)
        return _frame(pd.concat([read_table(p) for p in files], ignore_index=True) if files else [])
    if not path.exists():
        raise ValueError(f"no results table at {str(path)!r}")
    fmt = _format_of(path)
    if fmt == "json":
        data = json.loads(path.read_text() or "[]")
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of rows")
        return _frame(data)
    df = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    df = df.astype(object).where(df.notna(), None)
    df["params"] = [json.loads(p) if isinstance(p, str) and p.startswith("{") else p for p in df.get("params", [])]
    return _frame(df)


# --------------------------------------------------------------------------- patterns
PATTERN_NAMES = {"dense": Dense, "window": SlidingWindow, "sliding_window": SlidingWindow, "dilated": Dilated,
                 "global_local": GlobalLocal, "nsa": NSA}
_OPS = {Dense: "dense", SlidingWindow: "sliding_window", GlobalLocal: "global_local", Dilated: "dilated",
        NSA: "nsa", Custom: "custom", BlockSparse: "block_sparse"}


def parse_pattern(spec) -> Pattern:
    """A pattern from ``name[:key=value,...]``, e.g. ``window:window=512``, ``global_local:window=512,sink=64``,
    ``dilated:stride=8,block=64,window=512``, ``nsa:top_n=16,granularity=block``. A ``Pattern`` passes through."""
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"pattern must be a Pattern or a spec string like 'window:window=512', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    cls = PATTERN_NAMES.get(name.strip().lower())
    if cls is None:
        raise ValueError(f"pattern name must be one of {sorted(PATTERN_NAMES)}, got {name!r} in {spec!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in fields:
            raise ValueError(f"pattern {name!r} takes key=value items with keys in {sorted(fields)}, got {item!r}")
        kwargs[key] = {"true": True, "false": False}.get(value.lower(), int(value) if value.lstrip("-").isdigit() else value)
    return cls(**kwargs)


def pattern_op(pattern: Pattern) -> str:
    """The family name used in the ``op`` column (the same names as benchmarks/results)."""
    return next((_OPS[c] for c in type(pattern).__mro__ if c in _OPS), type(pattern).__name__.lower())


def pattern_params(pattern: Pattern) -> dict:
    """The pattern's JSON-able parameters (tensors and callables are left out)."""
    out = {}
    for f in dataclasses.fields(pattern) if dataclasses.is_dataclass(pattern) else ():
        v = getattr(pattern, f.name)
        if v is None or isinstance(v, (bool, int, float, str)):
            out[f.name] = v
        elif isinstance(v, tuple) and all(isinstance(x, (int, float, str)) for x in v):
            out[f.name] = list(v)
    return out


def nsa_expected_density(pattern: NSA, q_len: int, kv_len: Optional[int] = None) -> float:
    """Upper bound of the fraction of the causal area NSA's union branch attends to: per query, ``top_n``
    selected blocks plus the window beyond the always-chosen local blocks, capped by the keys that exist
    (the compressed branch's ~T/stride keys are not counted)."""
    kv_len = q_len if kv_len is None else kv_len
    n = torch.arange(kv_len - q_len + 1, kv_len + 1, dtype=torch.float64)  # causal keys per query
    # outside-window picks no longer include the local blocks the window holds (the last candidate may still
    # overlap the window by up to block - 1 keys: the result stays an upper bound)
    local = 0 if pattern.select_outside_window else pattern.local_blocks
    per_query = pattern.top_n * pattern.block + max(0, pattern.window - local * pattern.block)
    return float(torch.clamp(n, max=per_query).sum() / n.sum())


def pattern_density(pattern: Optional[Pattern], q_len: int, kv_len: int, device=None, head_dim: int = 64) -> Optional[float]:
    """Token-level density at these lengths: 1 for dense (None), the compiled layout's exact count for a
    static pattern (compiled here, through the cache the kernels use), NSA's upper bound."""
    if pattern is None:
        return 1.0
    if isinstance(pattern, NSA):
        return nsa_expected_density(pattern, q_len, kv_len)
    if pattern.dynamic:
        return None
    from .attention import layout_for
    return float(layout_for(pattern, q_len, kv_len, resolve_device(device), head_dim=head_dim).density)


def _require_kernels(pattern: Optional[Pattern]) -> None:
    from .attention import nsa_kernels_available
    if isinstance(pattern, NSA) and not nsa_kernels_available():
        raise NotImplementedError("the NSA kernels (nsa_viz.kernels.nsa) are not in this installation yet")


class Entry(NamedTuple):
    """One series of a run: ``pattern`` None is the dense baseline."""
    pattern: Optional[Pattern]
    op: str
    impl: str
    label: str
    params: dict

    def fields(self) -> dict:
        return dict(op=self.op, impl=self.impl, pattern=self.label, params=self.params, is_baseline=self.pattern is None)


def _entries(rec: "Recorder", patterns: Iterable, level: str, dense: Entry) -> List[Entry]:
    """Dense first, then each pattern; a spec that does not parse becomes an ``unsupported`` row."""
    out = [dense]
    for p in patterns:
        try:
            p = parse_pattern(p)
        except (TypeError, ValueError) as exc:
            rec.add(level=level, op=str(p), impl="nsa_viz", pattern=str(p), status="unsupported", note=str(exc)[:300])
            continue
        out.append(Entry(p, pattern_op(p), "nsa_viz", p.label, pattern_params(p)))
    return out


def _backend_name(pattern: Optional[Pattern], backend: str, device, dense: str) -> str:
    if pattern is None:
        return dense
    from .kernels import resolve_backend
    try:
        return resolve_backend(backend, torch.device(device))
    except (RuntimeError, ValueError):
        return backend


# --------------------------------------------------------------------------- recording rows, failures included
def new_run_id() -> str:
    """Sortable and unique: UTC time plus a short random suffix."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def classify_failure(exc: BaseException) -> tuple:
    """``(status, note)`` for an exception raised while measuring one configuration."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {first}"[:300]
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower():
        return "oom", text
    if isinstance(exc, (NotImplementedError, ValueError, TypeError, ImportError)):
        return "unsupported", text
    return "failed", text


class Recorder:
    """The rows of one run: each gets the run's environment, ``run_id`` and every schema column.
    ``attempt`` turns any exception into a row with a status, so one failure never ends the run."""

    def __init__(self, env: Optional[dict] = None, run_id: Optional[str] = None, mode: str = "custom",
                 verbose: bool = True, out=None):
        self.common = {**(env or environment()), "run_id": run_id or new_run_id(), "mode": mode}
        self.rows: List[dict] = []
        self.verbose = verbose
        self.out = Path(out) if out is not None else None

    def save(self) -> None:
        """With ``out`` set: write this run's rows so far (derived columns included) into that table,
        replacing its earlier save, so that a run stopped half-way keeps what it measured."""
        if self.out is not None:
            append_rows(add_derived(self.rows), self.out)

    @property
    def run_id(self) -> str:
        return self.common["run_id"]

    def add(self, **fields) -> dict:
        """Append a row (status ``ok`` unless given) and return it; unknown fields are an error."""
        unknown = set(fields) - set(SCHEMA)
        if unknown:
            raise ValueError(f"unknown row fields {sorted(unknown)}; the schema's columns are {COLUMNS}")
        row = {c: None for c in COLUMNS}
        row.update(self.common, status="ok", note="", is_baseline=False,
                   time=datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S"))
        row.update(fields)
        self.rows.append(row)
        return row

    def fail(self, row: dict, exc: BaseException) -> None:
        """Turn ``row`` into the record of a failure: measurements cleared, status and note set."""
        status, note = classify_failure(exc)
        row.update({k: None for k in _MEASURED}, status=status, note=note)
        if self.verbose:
            print(f"[bench] {row.get('level')} {row.get('pattern') or row.get('op')} {row.get('pass')} "
                  f"T={row.get('T')}: {status}: {note}", file=sys.stderr)
            if os.environ.get("NSA_VIZ_DEBUG"):
                traceback.print_exception(exc, file=sys.stderr)
        free_memory()

    def skip(self, reason: str = "", **fields) -> dict:
        """A row for a configuration not measured because the run's time budget was spent."""
        return self.add(**fields, status="skipped",
                        note=reason or "not measured: the run's time budget (--time-budget-s) was spent")

    @contextlib.contextmanager
    def attempt(self, **fields):
        """``with rec.attempt(level=..., **{"pass": "fwd"}) as row: row["ms"] = ...``: the row is added at
        once; an exception inside turns it into ``oom``/``unsupported``/``failed`` with the error as note."""
        row = self.add(**fields)
        try:
            yield row
        except Exception as exc:  # noqa: BLE001 - recording the failure is the point
            self.fail(row, exc)
        unknown = set(row) - set(SCHEMA)
        if unknown:
            raise ValueError(f"unknown row fields {sorted(unknown)}; the schema's columns are {COLUMNS}")


def measure_entries(rec: Recorder, device, items: Sequence[tuple], **timing) -> List[dict]:
    """Time several configurations together (``measure_many``), then take each one's peak memory.

    ``items``: ``(fields, build)`` pairs; ``build(row)`` returns the ``Trial`` of that row (and may
    fill descriptive columns). A row whose build, timing or memory measurement fails is recorded as
    such; the rows that succeeded are returned.
    """
    trials, rows = {}, {}
    for i, (fields, build) in enumerate(items):
        with rec.attempt(**fields) as row:
            rows[i] = row
            trials[i] = build(row)
    for i, res in measure_many(trials, device, **timing).items():
        row = rows[i]
        try:
            if isinstance(res, BaseException):
                raise res
            with _entered(trials[i]):
                mem = peak_memory(trials[i].fn, device)
            row.update(ms=res.ms, ms_p20=res.p20, ms_p80=res.p80, repeats=res.repeats,
                       peak_mem_mb=mem.peak_mb, mem_delta_mb=mem.delta_mb, mem_kind=mem.kind)
        except Exception as exc:  # noqa: BLE001
            rec.fail(row, exc)
    return [rows[i] for i in trials if rows[i]["status"] == "ok"]


class BatchSearch(NamedTuple):
    """What ``largest_batch`` found: ``max_batch`` fitted (0: not even 1); ``first_oom`` is the smallest
    batch that ran out of memory (None: none did, up to ``cap``), so the true limit lies in
    ``[max_batch, first_oom)``; ``probes`` are ``(batch, "ok" | "oom", seconds)`` in the order tried;
    ``stopped`` says why the search ended: ``"bracket"`` (limit found to within the tolerance), ``"cap"``,
    ``"time"`` (the time cap: ``max_batch`` is a lower bound) or ``"oom_at_1"``; ``peak_mb`` is the
    value ``fits`` returned for ``max_batch`` (e.g. its peak memory), if any."""
    max_batch: int
    first_oom: Optional[int]
    probes: list
    stopped: str
    peak_mb: Optional[float] = None

    def note(self) -> str:
        tried = ", ".join(f"{b}{'' if r == 'ok' else ' oom'}" for b, r, _ in self.probes)
        where = {"bracket": f"limit in [{self.max_batch}, {self.first_oom})",
                 "cap": f"reached the cap {self.max_batch}, the limit is higher",
                 "time": f"time cap hit: {self.max_batch} is a lower bound"
                         + (f" (limit below {self.first_oom})" if self.first_oom else ""),
                 "oom_at_1": "even batch 1 runs out of memory"}[self.stopped]
        return f"{where}; probes {tried} in {sum(s for _, _, s in self.probes):.1f} s"


def largest_batch(fits: Callable[[int], object], cap: int = 1024, *, rel_tol: float = 0.0,
                  time_cap_s: Optional[float] = None, clock: Callable[[], float] = time.perf_counter) -> BatchSearch:
    """Largest ``b <= cap`` for which ``fits(b)`` runs without running out of memory (see ``BatchSearch``).

    Doubling from 1, then bisection between the last batch that fitted and the first that did not,
    until they are within ``rel_tol`` of the former (0: exact), each probe one call of ``fits``. No probe
    starts once ``time_cap_s`` has passed since the first began, nor one that would end past it at the
    pace of the last probe that fitted (seconds per batch element); the answer is then a lower bound.
    ``fits`` may return a number (e.g. the probe's peak memory), kept for the answer. Errors other
    than out-of-memory propagate. Memory is freed after every failed probe.
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
    if rel_tol < 0:
        raise ValueError(f"rel_tol must be >= 0, got {rel_tol!r}")
    t0, probes, value = clock(), [], {}

    def ok(b: int) -> bool:
        start, res = clock(), None
        try:
            res = fits(b)
            fitted = True
        except Exception as exc:  # noqa: BLE001
            if classify_failure(exc)[0] != "oom":
                raise
            fitted = False
        if not fitted:  # outside the except block: its traceback no longer holds the probe's tensors
            free_memory()
        probes.append((b, "ok" if fitted else "oom", clock() - start))
        if fitted:
            value[b] = _num(res)
        return fitted

    def result(good, bad, stopped):
        return BatchSearch(good, bad, probes, stopped, value.get(good))

    if not ok(1):
        return result(0, 1, "oom_at_1")
    good, bad = 1, None
    while True:
        if bad is None and good >= cap:
            return result(good, None, "cap")
        if bad is not None and bad - good <= max(1, math.floor(good * rel_tol)):
            return result(good, bad, "bracket")
        b = min(cap, good * 2) if bad is None else (good + bad) // 2
        if time_cap_s is not None:
            pace = next(s / n for n, r, s in reversed(probes) if r == "ok")  # seconds per batch element
            if clock() - t0 + pace * b >= time_cap_s:
                return result(good, bad, "time")
        good, bad = (b, bad) if ok(b) else (good, b)


def _progress(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=not enabled)


def parse_dtype(name) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if isinstance(name, torch.dtype):
        return name
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- kernel level
def kernel_attention(pattern: Optional[Pattern], backend: str = "auto", decode: bool = False):
    """``fn(q, k, v) -> out`` on ``[B, H, T, D]`` tensors (what transformers hands an attention function):
    PyTorch SDPA for ``None`` (the dense baseline, whichever fused backend it picks; causal unless a
    single decode query sees the whole cache), else the pattern through ``attention.run_pattern``
    (the kernels take strides: the transposes are views). With ``decode``, NSA runs ``nsa_decode``
    on an ``NSACache`` filled on the first call, as a generation step would (``_nsa_decode_step``)."""
    if pattern is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] == k.shape[2],
                                                              enable_gqa=q.shape[1] != k.shape[1])
    _require_kernels(pattern)
    if decode and isinstance(pattern, NSA):
        return _nsa_decode_step(pattern, backend)
    from .attention import run_pattern

    def fn(q, k, v):
        out = run_pattern(pattern, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q.shape[-1] ** -0.5,
                          backend=backend)
        return out.transpose(1, 2)
    return fn


NSA_KERNEL_DECODE_NOTE = ("cached NSA decode: nsa_decode on an NSACache holding the compressed keys of the cache "
                          "(filled once, untimed), as a generation step runs it")


def _out_of_time(deadline: Optional[float]) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def _nsa_decode_step(pattern: NSA, backend: str):
    """One NSA decode step: the compressed keys of the cache's first ``T - 1`` tokens are made on the first
    call (what the generation kept up to date so far); every call then runs ``nsa_decode`` for the query
    at position ``T - 1``, whose own compression work (one block every ``cmp_stride`` steps) is done once."""
    from .attention import nsa_kwargs
    from .kernels.nsa_decode import NSACache, nsa_decode
    held = {}

    def fn(q, k, v):
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        cache = held.get("cache")
        if cache is None or cache.kv_len != k.shape[1]:
            cache = held["cache"] = NSACache(pattern.cmp_block, pattern.cmp_stride)
            cache.update(k[:, :-1], v[:, :-1])
        out = nsa_decode(q.transpose(1, 2), k, v, cache, **nsa_kwargs(pattern), scale=q.shape[-1] ** -0.5,
                         backend=backend)
        return out.transpose(1, 2)
    return fn


def bench_kernels(rec: Recorder, patterns: Iterable, lengths: Iterable[int], *, batch: int = 1, q_heads: int = 9,
                  kv_heads: int = 3, head_dim: int = 64, dtype=None, device=None, passes: Sequence[str] = KERNEL_PASSES,
                  backend: str = "auto", warmup_ms: float = 100.0, rep_ms: float = 400.0, seed: int = 0,
                  progress: bool = True, deadline: Optional[float] = None) -> List[dict]:
    """Time (median ms) and peak memory of each pattern's attention beside dense SDPA, per length and pass.

    ``fwd`` is an inference forward (no autograd graph), ``fwd_bwd`` a forward that records the graph
    plus the backward to q, k and v, ``decode`` one query against a cache of ``T`` keys (NSA: the cached
    decode path, ``nsa_decode`` on an ``NSACache`` holding the compressed keys). Dense and the patterns
    are measured together at every length, on the same inputs. Lengths not started by ``deadline``
    (a ``time.perf_counter()`` value) are recorded as ``skipped``. Returns the rows added to ``rec``.
    """
    dev = resolve_device(device)
    dtype = parse_dtype(dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32))
    bad = [p for p in passes if p not in KERNEL_PASSES]
    if bad:
        raise ValueError(f"passes must be among {KERNEL_PASSES}, got {bad}")
    lengths = sorted({int(t) for t in lengths})
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive integers, got {lengths}")
    start = len(rec.rows)
    entries = _entries(rec, patterns, "kernel", Entry(None, "dense", "sdpa", "dense (sdpa)", {}))
    shape = dict(level="kernel", HQ=q_heads, HKV=kv_heads, D=head_dim, dtype=_dtype_name(dtype))
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*s, grad=False):
        return torch.randn(*s, generator=gen, device=dev, dtype=torch.float32).to(dtype).requires_grad_(grad)

    def one_length(t: int) -> None:  # its tensors are freed when it returns
        fields = [dict(**e.fields(), **shape, B=batch, T=t,
                       backend=_backend_name(e.pattern, backend, dev, "sdpa")) for e in entries]
        try:  # [B, H, T, D], as transformers hands them
            q, k, v = rnd(batch, q_heads, t, head_dim), rnd(batch, kv_heads, t, head_dim), rnd(batch, kv_heads, t, head_dim)
            do, q1 = rnd(batch, q_heads, t, head_dim), rnd(batch, q_heads, 1, head_dim)
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        except Exception as exc:  # noqa: BLE001 - the inputs alone do not fit: record and go on
            for f in fields:
                for pas in passes:
                    with rec.attempt(**f, **{"pass": pas}):
                        raise exc
            return

        def build(entry: Entry, pas: str):
            def make(row):
                q_len = 1 if pas == "decode" else t
                row["density"] = pattern_density(entry.pattern, q_len, t, dev, head_dim)
                if pas == "decode" and isinstance(entry.pattern, NSA):
                    row["note"] = NSA_KERNEL_DECODE_NOTE
                attn = kernel_attention(entry.pattern, backend, decode=pas == "decode")
                if pas == "fwd_bwd":
                    return Trial(lambda: torch.autograd.grad(attn(qg, kg, vg), (qg, kg, vg), do))
                query = q1 if pas == "decode" else q

                def infer():
                    with torch.no_grad():
                        return attn(query, k, v)
                return Trial(infer)
            return make

        for pas in passes:
            measure_entries(rec, dev, [({**f, "pass": pas}, build(e, pas)) for f, e in zip(fields, entries)],
                            warmup_ms=warmup_ms, rep_ms=rep_ms)

    for t in _progress(lengths, "kernels", progress):
        if _out_of_time(deadline):
            for e in entries:
                for pas in passes:
                    rec.skip(**e.fields(), **shape, B=batch, T=t, **{"pass": pas})
            continue
        one_length(t)
        free_memory()
        rec.save()
    return rec.rows[start:]


# --------------------------------------------------------------------------- model level
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
# SmolLM2-135M-Instruct's architecture (read from its GGUF), to build it with random weights where the
# GGUF reader is missing (the GPU image): speed does not depend on the weights, accuracy does.
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _is_default_model(model) -> bool:
    return model in (None, "", "smollm2", "default")


def load_bench_model(model: Optional[str], device, dtype=None, random_weights: bool = False):
    """``(model, tokenizer)``: through ``nsa_viz.models.load_model`` (``smollm2``/None: the default model),
    or, with ``random_weights``, the same architecture from its config with random weights and no
    tokenizer (speed rows only)."""
    dev = resolve_device(device)
    dtype = parse_dtype(dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32))
    if random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
        cfg = (LlamaConfig(**SMOLLM2_CONFIG) if _is_default_model(model)
               else AutoConfig.from_pretrained(model, local_files_only=True))
        torch.manual_seed(0)
        mdl = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        return mdl.to(device=dev, dtype=dtype).eval(), None
    from .models import load_model
    return load_model(None if _is_default_model(model) else model, dtype=dtype, device=dev)


def _prefill(model, ids):
    """One prefill as serving does it: fill the KV cache, logits of the last position only."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def _kv_cache(out):
    """The KV cache a forward returned: ``cache`` from transformers 5.25 on (``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def _decode_ms(model, ids, new_tokens: int, device) -> float:
    """Prefill ``ids`` (untimed), then ``new_tokens`` greedy decode steps with the KV cache: ms per step."""
    out = _prefill(model, ids)
    cache, nxt = _kv_cache(out), out.logits[:, -1:].argmax(-1)
    # transformers 5.25 renamed the argument (the old name warns, and goes in 5.40)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{cache_arg: cache})
            cache, nxt = _kv_cache(out), out.logits[:, -1:].argmax(-1)
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / new_tokens


def _applied(model, pattern: Optional[Pattern], backend: str):
    """Context: ``model`` running ``pattern`` in every layer (None: its own attention), restored after."""
    if pattern is None:
        return contextlib.nullcontext(model)
    _require_kernels(pattern)
    from .models import apply_pattern
    return apply_pattern(model, pattern, backend=backend)


def _decode_path_note() -> str:
    """Which path NSA decode steps take inside a model (``attention._run_nsa``): the cached one when the
    decode kernels are installed."""
    try:
        from .attention import _nsa_decode
        cached = _nsa_decode() is not None
    except ImportError:  # attention.py reorganised: say so rather than fail the run
        return "NSA steps: decode path unknown"
    return ("NSA steps: cached decode (nsa_decode on each layer's NSACache)" if cached else
            "NSA steps: uncached (nsa_attention of the new query over the whole cache)")


def model_label(model: Optional[str], model_name: Optional[str] = None, random_weights: bool = False) -> str:
    """The ``model`` column: ``model_name`` if given, the default model's name for ``smollm2``, else ``model``."""
    name = model_name or (DEFAULT_MODEL if _is_default_model(model) else str(model))
    return name + (" (random weights)" if random_weights else "")


def bench_model(rec: Recorder, patterns: Iterable, *, model: Optional[str] = None, lengths: Iterable[int] = (256, 512),
                device=None, dtype=None, batch: int = 1, gen_tokens: int = 8, max_batch_lengths: Iterable[int] = (),
                max_batch_cap: int = 1024, max_batch_time_s: Optional[float] = 60.0, max_batch_tol: float = 0.125,
                speed: bool = True, accuracy: bool = True, accuracy_lengths: Optional[Iterable[int]] = None,
                random_weights: bool = False, model_name: Optional[str] = None, fallback_random_weights: bool = False,
                dataset: Optional[str] = None,
                eval_tokens: int = 1024, passkey_prompts: int = 4, warmup_ms: float = 100.0, rep_ms: float = 400.0,
                backend: str = "auto", seed: int = 0, progress: bool = True, loaded=None,
                deadline: Optional[float] = None) -> List[dict]:
    """Whole-model rows with each pattern in every layer, the model's own attention as the baseline:
    prefill and generation throughput and peak memory per prompt length (generation under NSA takes
    the cached decode path of ``nsa_viz.attention``), accuracy against dense (``bench_accuracy``, at
    ``accuracy_lengths``, default ``lengths``), then the largest prefill batch per length of
    ``max_batch_lengths`` (``bench_max_batch``; last, because a device error there could spoil what
    follows). ``loaded`` may pass an already loaded ``(model, tokenizer)``. A model that cannot be
    loaded gives failed rows, not an exception; with ``fallback_random_weights`` the default model's
    architecture with random weights is then measured instead (speed rows). Work not started by
    ``deadline`` gives skipped rows."""
    dev = resolve_device(device)
    start = len(rec.rows)
    label = model_label(model, model_name, random_weights)
    try:
        mdl, tok = loaded if loaded is not None else load_bench_model(model, dev, dtype, random_weights)
    except Exception as exc:  # noqa: BLE001 - the kernel rows of this run stay useful
        for pas in (["prefill"] if speed else []) + (["accuracy"] if accuracy else []):
            with rec.attempt(level="model", op="dense", impl="hf", pattern="model", model=label, is_baseline=True,
                             **{"pass": pas}):
                raise RuntimeError(f"loading the model: {exc}") from exc
        if not fallback_random_weights or random_weights or not label.startswith(DEFAULT_MODEL):
            return rec.rows[start:]
        print("[bench] measuring SmolLM2's architecture with random weights instead (speed rows only)", file=sys.stderr)
        random_weights, label = True, model_label(None, None, True)
        mdl, tok = load_bench_model(None, dev, dtype, random_weights=True)
    cfg = mdl.config
    shape = dict(level="model", model=label, dtype=_dtype_name(next(mdl.parameters()).dtype), HQ=cfg.num_attention_heads,
                 HKV=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                 D=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    own = cfg._attn_implementation or "eager"
    entries = _entries(rec, patterns, "model", Entry(None, "dense", "hf", f"dense ({own})", {}))
    lengths = sorted({int(t) for t in lengths})
    gen = torch.Generator().manual_seed(seed)

    def fields(e: Entry, pass_: Optional[str] = None, **extra) -> dict:
        return {**e.fields(), **shape, "backend": _backend_name(e.pattern, backend, dev, own), "pass": pass_, **extra}

    if speed:
        decode_note = _decode_path_note()
        for t in _progress(lengths, "model", progress):
            if _out_of_time(deadline):
                for e in entries:
                    rec.skip(**fields(e, B=batch, T=t, pass_="prefill"))
                    if gen_tokens > 0:
                        rec.skip(**fields(e, B=batch, T=t, new_tokens=gen_tokens, pass_="generate"))
                continue
            # random token ids: a static pattern costs the same on any text, and NSA's selection
            # changes which blocks are read, not how many
            ids = torch.randint(0, cfg.vocab_size, (batch, t), generator=gen).to(dev)

            def build(e: Entry, pas: str):
                def make(row):
                    q_len, kv_len = (t, t) if pas == "prefill" else (1, t + gen_tokens // 2)
                    row["density"] = pattern_density(e.pattern, q_len, kv_len, dev, shape["D"])
                    ctx = lambda: _applied(mdl, e.pattern, backend)  # noqa: E731
                    if pas == "prefill":
                        return Trial(lambda: _prefill(mdl, ids), ctx)
                    return Trial(lambda: _decode_ms(mdl, ids, gen_tokens, dev), ctx, self_timed=True)
                return make

            done = measure_entries(rec, dev, [(fields(e, B=batch, T=t, pass_="prefill"), build(e, "prefill"))
                                              for e in entries], warmup_ms=warmup_ms, rep_ms=rep_ms)
            if gen_tokens > 0:
                note = (f"ms per decode step after a {t}-token prompt (median of 3 runs of {gen_tokens} steps; "
                        "density at the middle step)")
                done += measure_entries(rec, dev, [(fields(e, B=batch, T=t, new_tokens=gen_tokens, pass_="generate",
                                                           note=note + ("; " + decode_note if isinstance(e.pattern, NSA)
                                                                        else "")),
                                                    build(e, "generate")) for e in entries],
                                        warmup_ms=0.0, rep_ms=0.0, min_repeats=3, max_repeats=3)
            for row in done:
                row["tokens_per_s"] = batch * (t if row["pass"] == "prefill" else 1) / (row["ms"] / 1e3)
            del ids
            free_memory()
            rec.save()
    if accuracy:
        bench_accuracy(rec, entries, mdl, tok, fields=fields,
                       lengths=lengths if accuracy_lengths is None else sorted({int(t) for t in accuracy_lengths}),
                       dataset=dataset, eval_tokens=eval_tokens, passkey_prompts=passkey_prompts,
                       random_weights=random_weights, device=dev, seed=seed, progress=progress, deadline=deadline)
    if speed and max_batch_lengths:
        bench_max_batch(rec, entries, mdl, fields=fields, lengths=max_batch_lengths, device=dev, cap=max_batch_cap,
                        time_cap_s=max_batch_time_s, rel_tol=max_batch_tol, backend=backend, deadline=deadline)
    return rec.rows[start:]


def bench_max_batch(rec: Recorder, entries: List[Entry], model, *, fields: Callable, lengths: Iterable[int],
                    device=None, cap: int = 1024, time_cap_s: Optional[float] = 60.0, rel_tol: float = 0.125,
                    backend: str = "auto", deadline: Optional[float] = None) -> None:
    """``max_batch`` rows: per length and entry, the largest batch whose prefill (KV cache kept, logits of
    the last position) fits (``largest_batch``: doubling, then bisection to within ``rel_tol``; each
    probe one prefill of random ids, memory emptied before it; each search capped at ``time_cap_s`` and
    by what is left before ``deadline``). On a CPU nothing runs out of memory: the search stops at
    ``cap`` (for checking the code path at small sizes). ``peak_mem_mb`` is the largest fitting
    probe's peak; probes and bracket are in the note."""
    dev = resolve_device(device)
    vocab = model.config.vocab_size
    todo = [(t, e) for t in sorted({int(x) for x in lengths}) for e in entries]
    for i, (t, e) in enumerate(todo):
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left <= 0:
            rec.skip(**fields(e, T=t, pass_="max_batch"))
            continue
        share = None if left is None else left / (len(todo) - i)  # the rest of the budget, shared fairly
        limit = share if time_cap_s is None else (time_cap_s if share is None else min(time_cap_s, share))

        def fits(b: int) -> Optional[float]:
            free_memory()  # empty the caching allocator: the last probe's blocks would fragment this one's
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            ids = torch.randint(0, vocab, (b, t), device=dev)
            with _applied(model, e.pattern, backend):  # re-applied per probe: no decode state outlives it
                out = _prefill(model, ids)
                synchronize(dev)
            del out, ids
            return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None

        with rec.attempt(**fields(e, T=t, pass_="max_batch")) as row:
            found = largest_batch(fits, cap, rel_tol=rel_tol, time_cap_s=limit)
            row.update(max_batch=found.max_batch, peak_mem_mb=found.peak_mb,
                       mem_kind="cuda_max_allocated" if found.peak_mb is not None else None,
                       note=f"prefill with KV cache, cap {cap}, tolerance {rel_tol:g}"
                            + (f", time cap {limit:.0f} s" if limit is not None else "") + ": " + found.note()
                            + ("; CPU: no device memory limit, bounded by the cap" if dev.type == "cpu" else ""))
            if found.max_batch == 0:
                row["status"] = "oom"
        free_memory()
        rec.save()


def eval_text(dataset: Optional[str]) -> tuple:
    """``(text, name)`` for perplexity: the Python reference manual (``pydoc_data.topics``, on every
    machine) by default, or a text file."""
    if dataset in (None, "", "pydoc", "pydoc_data.topics"):
        from .accuracy import default_filler
        return default_filler(), "pydoc_data.topics"
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(f"dataset must be 'pydoc' (the default) or a text file, got {dataset!r}")
    return path.read_text(errors="replace"), path.name


def _per_pattern(make, patterns: dict, dense_label: str):
    """``make(patterns) -> DataFrame`` for all patterns at once; if that raises, once per pattern (with
    dense beside it) so that one pattern's failure costs only its own rows. Returns ``(frame, errors)``."""
    import pandas as pd
    try:
        return make(patterns), {}
    except Exception:  # noqa: BLE001 - retried one by one below to find which pattern fails
        free_memory()
    frames, errors = [], {}
    for label, p in patterns.items():
        if p is None:
            continue
        try:
            f = make({dense_label: None, label: p})
            frames.append(f if not frames else f[f["pattern"] != dense_label])
        except Exception as exc:  # noqa: BLE001
            errors[label] = exc
            free_memory()
    if not frames:  # dense itself fails: every row fails with it
        try:
            frames.append(make({dense_label: None}))
        except Exception as exc:  # noqa: BLE001
            errors = {label: exc for label in patterns}
    return (pd.concat(frames, ignore_index=True) if frames else None), errors


def bench_accuracy(rec: Recorder, entries: List[Entry], model, tokenizer, *, fields: Callable, lengths: Sequence[int],
                   dataset: Optional[str] = None, eval_tokens: int = 1024, passkey_prompts: int = 4,
                   random_weights: bool = False, device=None, seed: int = 0, progress: bool = True,
                   deadline: Optional[float] = None) -> None:
    """Accuracy rows against the model's own attention, at each length: ``accuracy`` (perplexity,
    perplexity delta, KL(dense || pattern), top-1 agreement over about ``eval_tokens`` tokens of text,
    in windows of the length spread over the text) and ``passkey`` (``passkey_prompts`` prompts with
    the key at evenly spaced depths). Dense is measured in the same call, on the same tokens. Lengths
    not started by ``deadline`` give skipped rows."""
    from . import accuracy as acc
    dense_label = entries[0].label
    patterns = {e.label: e.pattern for e in entries}
    try:
        if random_weights or tokenizer is None:
            raise NotImplementedError("accuracy needs the real weights and tokenizer (this model has random weights)")
        text, name = eval_text(dataset)
    except Exception as exc:  # noqa: BLE001
        for e in entries:
            for pas in ("accuracy", "passkey"):
                with rec.attempt(**fields(e, pass_=pas)):
                    raise exc
        return
    for t in lengths:
        if _out_of_time(deadline):
            for e in entries:
                for pas in ("accuracy", "passkey"):
                    rec.skip(**fields(e, B=1, T=t, pass_=pas))
            continue
        windows = max(1, eval_tokens // t)
        span = 12 * t  # characters: enough for t tokens of prose (~4-5 characters a token)
        offsets = [i * max(0, len(text) - span) // windows for i in range(windows)]
        texts = {f"{name}@{o}": text[o:o + span] for o in offsets}
        depths = [i / max(1, passkey_prompts - 1) for i in range(passkey_prompts)]
        tables = {
            "accuracy": _per_pattern(lambda ps: acc.perplexity_table(model, tokenizer, texts, ps, [t], progress=progress),
                                     patterns, dense_label),
            "passkey": _per_pattern(lambda ps: acc.passkey_table(model, tokenizer, ps, [t], depths=depths, trials=1,
                                                                 seed=seed, progress=progress), patterns, dense_label)}
        for pas, (df, errors) in tables.items():
            for e in entries:
                with rec.attempt(**fields(e, B=1, T=t, pass_=pas, dataset=name if pas == "accuracy" else "passkey")) as row:
                    if e.label in errors:
                        raise errors[e.label]
                    row["density"] = pattern_density(e.pattern, t, t, device, fields(e)["D"])
                    mine = df[df["pattern"] == e.label]
                    if pas == "passkey":
                        row.update(passkey_acc=float(mine["correct"].mean()), n_eval=len(mine))
                        continue
                    w = mine["tokens"] / mine["tokens"].sum()
                    ppl, dense_ppl = math.exp((w * mine["nll"]).sum()), math.exp((w * mine["dense_ppl"].map(math.log)).sum())
                    row.update(ppl=ppl, ppl_delta=ppl - dense_ppl, kl=float((w * mine["kl_vs_dense"]).sum()),
                               top1_agree=float((w * mine["top1_agree"]).sum()), n_eval=int(mine["tokens"].sum()),
                               note=f"{len(mine)} window(s) of {t} tokens")
        rec.save()


# --------------------------------------------------------------------------- ratios, crossovers, Pareto front
_SHAPE_KEYS = ("run_id", "level", "pass", "B", "T", "HQ", "HKV", "D", "dtype", "model", "dataset", "new_tokens")
_SERIES_KEYS = ("run_id", "level", "op", "impl", "pattern", "pass", "B", "HQ", "HKV", "D", "dtype", "model",
                "dataset", "new_tokens")
_PARETO_SCORE = {"accuracy": (("kl", -1), ("ppl_delta", -1), ("top1_agree", 1)), "passkey": (("passkey_acc", 1),)}


def _num(x) -> Optional[float]:
    """A finite float, or None (None, NaN, pandas NA, strings and booleans are all 'no value')."""
    if x is None or isinstance(x, (str, bool)):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _key(row: dict, keys) -> tuple:
    return tuple(_num(row.get(k)) if _num(row.get(k)) is not None else
                 (None if row.get(k) is None else str(row.get(k))) for k in keys)


def _ratio(a, b) -> Optional[float]:
    a, b = _num(a), _num(b)
    return a / b if a is not None and b not in (None, 0.0) else None


def _crossover(points) -> Optional[float]:
    """Smallest length from which speedup stays >= 1 over the measured ``[(T, speedup)]`` (sorted by T),
    log-log interpolated between the last losing and the first winning length; None if it never wins."""
    if not points or points[-1][1] < 1.0:
        return None
    i = len(points) - 1
    while i > 0 and points[i - 1][1] >= 1.0:
        i -= 1
    if i == 0:
        return float(points[0][0])
    (t0, s0), (t1, s1) = points[i - 1], points[i]
    if s0 <= 0 or s1 == s0:
        return float(t1)
    frac = -math.log(s0) / (math.log(s1) - math.log(s0))
    return float(math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))))


def add_derived(table):
    """A copy of ``table`` (DataFrame or rows) with the columns computed against dense.

    A row's baseline is the ``is_baseline`` row with status ok of the same run, level, pass and shape
    (batch, length, heads, dtype, model, dataset): ``speedup_vs_dense``, ``mem_vs_dense``,
    ``max_batch_vs_dense`` and, where only ``ppl`` was given, ``ppl_delta``. Per series (one pattern and
    pass over lengths): ``crossover_T``. On accuracy rows, ``pareto``: no other row of the group has
    lower-or-equal density and a better-or-equal score, one of them strictly (score: KL, else
    perplexity delta, else top-1 agreement; passkey accuracy). Rows of other runs are never compared.
    """
    rows = _to_records(table)
    base = {}
    for r in rows:
        if r.get("is_baseline") in (True, 1, "True", "true") and r.get("status") == "ok":
            base.setdefault(_key(r, _SHAPE_KEYS), r)
    series, groups = {}, {}
    for r in rows:
        r.update(label=short_label(r), speedup_vs_dense=None, mem_vs_dense=None, max_batch_vs_dense=None,
                 crossover_T=None, pareto=None)
        b = base.get(_key(r, _SHAPE_KEYS))
        if r.get("status") != "ok":
            continue
        if b is not None:
            r["speedup_vs_dense"] = _ratio(b.get("ms"), r.get("ms")) or _ratio(r.get("tokens_per_s"), b.get("tokens_per_s"))
            r["mem_vs_dense"] = _ratio(r.get("peak_mem_mb"), b.get("peak_mem_mb"))
            r["max_batch_vs_dense"] = _ratio(r.get("max_batch"), b.get("max_batch"))
            if _num(r.get("ppl_delta")) is None and _num(r.get("ppl")) is not None and _num(b.get("ppl")) is not None:
                r["ppl_delta"] = r["ppl"] - b["ppl"]
        if r.get("pass") in SPEED_PASSES and not r.get("is_baseline") and r["speedup_vs_dense"] is not None:
            series.setdefault(_key(r, _SERIES_KEYS), []).append(r)
        if r.get("pass") in _PARETO_SCORE and _num(r.get("density")) is not None:
            groups.setdefault(_key(r, _SHAPE_KEYS), []).append(r)
    for members in series.values():
        cross = _crossover(sorted({(float(m["T"]), m["speedup_vs_dense"]) for m in members if _num(m.get("T"))}))
        for m in members:
            m["crossover_T"] = cross
    for members in groups.values():
        metric = next(((m, sign) for m, sign in _PARETO_SCORE[members[0]["pass"]]
                       if all(_num(x.get(m)) is not None for x in members)), None)
        if metric is None:
            continue
        name, sign = metric
        for r in members:
            d, s = r["density"], sign * r[name]
            r["pareto"] = not any(o is not r and o["density"] <= d and sign * o[name] >= s
                                  and (o["density"] < d or sign * o[name] > s) for o in members)
    return _frame(rows)


def crossover_table(table):
    """One row per measured series (pattern x pass x shape of a run): speedups at the smallest and
    largest length and the crossover length from which the pattern beats dense."""
    import pandas as pd
    df = add_derived(table)
    df = df[df["pass"].isin(SPEED_PASSES) & ~df["is_baseline"].astype(bool) & df["speedup_vs_dense"].notna()]
    out = []
    for _, g in df.groupby(list(_SERIES_KEYS), dropna=False, sort=False):
        g = g.sort_values("T")
        first, last = g.iloc[0], g.iloc[-1]
        out.append({**{k: first[k] for k in ("run_id", "device", "level", "op", "impl", "pattern", "pass", "model",
                                             "HQ", "HKV", "D", "label")},
                    "T_min": first["T"], "speedup_at_T_min": first["speedup_vs_dense"], "T_max": last["T"],
                    "speedup_at_T_max": last["speedup_vs_dense"], "crossover_T": first["crossover_T"]})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- one run: configuration, CLI
QUICK = dict(  # a CPU, a few minutes on SmolLM2: SmolLM2's attention shape, lengths the reference path can do
    patterns=["window:window=128", "global_local:window=128,sink=32", "dilated:stride=4,block=64,window=128",
              "nsa:block=32,top_n=4,window=64,cmp_block=32,cmp_stride=16"],
    lengths=[256, 512, 1024], q_heads=9, kv_heads=3, head_dim=64, dtype="float32", warmup_ms=20.0, rep_ms=100.0,
    model_lengths=[256, 512], gen_tokens=4, max_batch_lengths=[], eval_tokens=512, passkey_prompts=3,
    accuracy_lengths=None, max_batch_cap=1024, max_batch_time_s=60.0)
FULL = dict(  # a GPU: the lengths where sparse attention matters, the shape of a large GQA model
    patterns=["window:window=512", "global_local:window=512,sink=64", "nsa"],
    lengths=[8192, 16384, 32768, 65536], q_heads=64, kv_heads=4, head_dim=128, dtype="bfloat16", warmup_ms=100.0,
    rep_ms=400.0, model_lengths=[1024, 2048, 4096, 8192], gen_tokens=16, max_batch_lengths=[8192],
    eval_tokens=16384, passkey_prompts=8, accuracy_lengths=None, max_batch_cap=1024, max_batch_time_s=60.0)
LEVELS = ("kernel", "model", "accuracy")


def default_results_path(env: dict, fmt: str = "json", folder="data/results") -> Path:
    """``<folder>/tradeoffs_<device>.<fmt>``: one file per kind of device (``h100``, ``cpu``), so the
    results of a GPU and of a laptop live side by side and ``read_table(folder)`` reads them all."""
    slug = "cpu"
    if env["device_type"] == "cuda":
        words = env["device"].lower().replace("nvidia", "").split()
        slug = words[0] if words else "cuda"
    return Path(folder) / f"tradeoffs_{slug}.{fmt}"


def add_arguments(parser) -> None:
    """Arguments of ``nsa-viz bench``."""
    g = parser.add_argument_group("what to measure")
    g.add_argument("--quick", action="store_true",
                   help="small CPU-sized run (a few minutes on SmolLM2); without it, full GPU-sized defaults")
    g.add_argument("--patterns", nargs="+", metavar="SPEC",
                   help="patterns besides dense, as name:key=value,... with name in "
                        f"{sorted(PATTERN_NAMES)}, e.g. window:window=512 nsa:top_n=16 (dense is always measured)")
    g.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS),
                   help="kernel: attention alone; model: prefill/generation throughput and memory; accuracy: vs dense")
    g.add_argument("--lengths", nargs="+", type=int, help="kernel-level sequence lengths")
    g.add_argument("--passes", nargs="+", choices=KERNEL_PASSES, default=list(KERNEL_PASSES), help="kernel-level passes")
    g.add_argument("--batch", type=int, default=1, help="batch size of the timed runs")
    g.add_argument("--q-heads", type=int, help="kernel-level query heads")
    g.add_argument("--kv-heads", type=int, help="kernel-level key/value heads")
    g.add_argument("--head-dim", type=int, help="kernel-level head dim")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="kernel-level dtype (default: bfloat16 on CUDA, float32 on a CPU)")
    g.add_argument("--model", default="smollm2", help="model for the model/accuracy levels: 'smollm2', a local folder or a hub id")
    g.add_argument("--model-name", default=None,
                   help="name for the model column (default: SmolLM2-135M-Instruct for 'smollm2', else --model), "
                        "e.g. when --model is a path to the default model's GGUF")
    g.add_argument("--random-weights", action="store_true",
                   help="build the model from its config with random weights (speed rows only; no GGUF reader needed)")
    g.add_argument("--fallback-random-weights", action="store_true",
                   help="if the default model's weights cannot be loaded (e.g. no GGUF reader), record that and measure "
                        "its architecture with random weights instead (speed rows)")
    g.add_argument("--dataset", default=None, help="text file for perplexity/KL (default: pydoc_data.topics)")
    g.add_argument("--model-lengths", nargs="+", type=int, help="model-level prompt lengths (speed and accuracy)")
    g.add_argument("--gen-tokens", type=int, help="new tokens per sequence when timing generation")
    g.add_argument("--max-batch-lengths", nargs="*", type=int, default=None,
                   help="model-level lengths at which to find the largest prefill batch (a GPU; on a CPU the search "
                        "only checks the code path, up to --max-batch-cap); give none to skip")
    g.add_argument("--max-batch-cap", type=int, help="largest batch tried (default 1024)")
    g.add_argument("--max-batch-time-s", type=float, help="time cap of one largest-batch search, seconds (default 60)")
    g.add_argument("--accuracy-lengths", nargs="+", type=int, help="lengths for accuracy (default: --model-lengths)")
    g.add_argument("--eval-tokens", type=int, help="tokens of text per length for perplexity/KL")
    g.add_argument("--passkey-prompts", type=int, help="passkey prompts per length")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 is often faster on a machine shared with "
                        "other busy processes, where threads of one op wait for each other")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"], help="kernel backend for patterns")
    g.add_argument("--warmup-ms", type=float, help="warm-up time per measurement")
    g.add_argument("--rep-ms", type=float, help="timed repeats per measurement, in ms (at least 3 repeats)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--time-budget-s", type=float, default=None,
                   help="stop starting new measurements after this many seconds (counted from the start of the run, "
                        "model loading included); what was not measured is recorded as skipped")
    o = parser.add_argument_group("where results go")
    o.add_argument("--out", default=None, help="results table file (.json/.csv/.parquet) or folder "
                                                 "(default data/results/tradeoffs_<device>.json); rows are appended")
    o.add_argument("--figures", default=None, metavar="DIR", help="also write the trade-off figures as HTML files here")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_bench(args):
    """One ``nsa-viz bench`` run: measure level by level, saving this run's rows (with the derived
    columns) after each, so an interrupted run keeps what it measured. Returns the rows as a DataFrame."""
    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    env = environment(device)
    s = dict(QUICK if args.quick else FULL)
    s.update({k: v for k, v in vars(args).items() if k in s and v is not None})
    mode = "quick" if args.quick else "full"
    if mode == "full" and device.type == "cpu" and not args.lengths:
        print("[bench] full mode on a CPU runs GPU-sized lengths through the reference path and will be very slow; "
              "use --quick or --lengths", file=sys.stderr)
    if device.type == "cpu" and (env["load_avg"] or 0) > (os.cpu_count() or 1):
        print(f"[bench] load average {env['load_avg']} on {os.cpu_count()} cores: other processes will slow these "
              "timings (dense and patterns are interleaved, so ratios suffer less than times)", file=sys.stderr)
    out = Path(args.out) if args.out else default_results_path(env)
    if out.suffix == "" or out.is_dir():
        out = default_results_path(env, folder=out)
    _format_of(out)
    rec = Recorder(env, mode=mode, out=out)
    patterns = []
    for spec in s["patterns"]:
        try:
            patterns.append(parse_pattern(spec))
        except (TypeError, ValueError) as exc:
            rec.add(level="kernel", op=str(spec), impl="nsa_viz", pattern=str(spec), status="unsupported", note=str(exc)[:300])
    progress, t0 = not args.no_progress, time.perf_counter()
    budget = getattr(args, "time_budget_s", None)
    if budget is not None and budget <= 0:
        raise ValueError(f"--time-budget-s must be > 0, got {budget}")
    deadline = None if budget is None else t0 + budget
    if "kernel" in args.levels:
        bench_kernels(rec, patterns, s["lengths"], batch=args.batch, q_heads=s["q_heads"], kv_heads=s["kv_heads"],
                      head_dim=s["head_dim"], dtype=args.dtype or (s["dtype"] if device.type == "cuda" else "float32"),
                      device=device, passes=args.passes, backend=args.backend, warmup_ms=s["warmup_ms"],
                      rep_ms=s["rep_ms"], seed=args.seed, progress=progress, deadline=deadline)
    if "model" in args.levels or "accuracy" in args.levels:
        bench_model(rec, patterns, model=args.model, lengths=s["model_lengths"], device=device, batch=args.batch,
                    gen_tokens=s["gen_tokens"], max_batch_lengths=s["max_batch_lengths"],
                    max_batch_cap=s["max_batch_cap"], max_batch_time_s=s["max_batch_time_s"],
                    speed="model" in args.levels, accuracy="accuracy" in args.levels,
                    accuracy_lengths=s["accuracy_lengths"], random_weights=args.random_weights,
                    model_name=getattr(args, "model_name", None),
                    fallback_random_weights=getattr(args, "fallback_random_weights", False),
                    dataset=args.dataset, eval_tokens=s["eval_tokens"],
                    passkey_prompts=s["passkey_prompts"], warmup_ms=s["warmup_ms"], rep_ms=s["rep_ms"],
                    backend=args.backend, seed=args.seed, progress=progress, deadline=deadline)
    rec.save()
    df = add_derived(rec.rows)
    print(f"[bench] run {rec.run_id}: {len(df)} rows ({int((df['status'] != 'ok').sum())} not ok) in "
          f"{time.perf_counter() - t0:.0f} s on {env['device']} -> {out}")
    print(summary_text(df))
    if args.figures:
        from . import plots_tradeoffs
        folder = Path(args.figures)
        folder.mkdir(parents=True, exist_ok=True)
        for name, fig in plots_tradeoffs.tradeoff_figures(df).items():
            fig.write_html(folder / f"{name}.html", include_plotlyjs="cdn")
        print(f"[bench] figures -> {folder}")
    return df


_KEY_PARAMS = {"sliding_window": ("window",), "global_local": ("window", "sink"), "dilated": ("stride", "block", "window"),
               "nsa": ("block", "top_n", "window")}


def short_label(row: dict) -> str:
    """``op(key=value, ...)``: the family's key parameters and any other that differs from its default,
    e.g. ``sliding_window(window=128)``; dense rows keep their label, e.g. ``dense (sdpa)``."""
    if row.get("is_baseline") in (True, 1, "True", "true"):
        return str(row.get("pattern") or f"dense ({row.get('impl')})")
    cls = next((c for c, op in _OPS.items() if op == row.get("op")), None)
    params = row.get("params") if isinstance(row.get("params"), dict) else None
    if cls is None or params is None or not dataclasses.is_dataclass(cls):
        return str(row.get("pattern") or row.get("op"))
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    key = _KEY_PARAMS.get(row["op"], ())
    changed = [f"{k}={v}" for k, v in params.items()
               if k in key or k not in defaults or defaults[k] != (tuple(v) if isinstance(v, list) else v)]
    return f"{row['op']}({', '.join(changed)})"


def summary_text(table) -> str:
    """A printable digest: per level and pass, ms or tokens/s and the speedup over dense per length;
    then accuracy, what failed, and the crossover lengths."""
    df = add_derived(table)
    lines = []
    speed = df[df["pass"].isin(SPEED_PASSES)]
    for (level, pas), g in speed.groupby(["level", "pass"], sort=False):
        value = "ms" if level == "kernel" else "tokens_per_s"
        cells = g.apply(lambda r: "failed" if _num(r[value]) is None else f"{r[value]:.4g}" + (
            f" ({r['speedup_vs_dense']:.2f}x)" if _num(r["speedup_vs_dense"]) is not None else ""), axis=1)
        pivot = g.assign(cell=cells).pivot_table(index="label", columns="T", values="cell", aggfunc="first", sort=False)
        lines += [f"\n{level} {pas}: {value} (speedup vs dense)", pivot.fillna("-").to_string()]
    mb = df[(df["pass"] == "max_batch") & (df["status"] == "ok")]
    if len(mb):
        cells = mb.apply(lambda r: f"{int(r['max_batch'])}" + (
            f" ({r['max_batch_vs_dense']:.2f}x)" if _num(r["max_batch_vs_dense"]) is not None else ""), axis=1)
        pivot = mb.assign(cell=cells).pivot_table(index="label", columns="T", values="cell", aggfunc="first", sort=False)
        lines += ["\nlargest prefill batch (vs dense)", pivot.fillna("-").to_string()]
    acc = df[df["pass"].isin(["accuracy", "passkey"]) & (df["status"] == "ok")]
    if len(acc):
        cols = [c for c in ("density", "ppl", "ppl_delta", "kl", "top1_agree", "passkey_acc") if acc[c].notna().any()]
        lines += ["\naccuracy vs dense", acc.set_index(["pass", "T", "label"])[cols].astype(float).round(4).to_string()]
    bad = df[df["status"] != "ok"]
    if len(bad):
        lines.append("\nnot ok")
        for (label, status, note), g in bad.groupby(["label", "status", "note"], sort=False):
            lines.append(f"  {label[:44]:44s} {status} x{len(g)}: {str(note)[:160]}")
    cross = crossover_table(df)
    if len(cross):
        lines.append("\ncrossover (length from which the pattern beats dense)")
        for r in cross.to_dict("records"):
            c = _num(r["crossover_T"])
            where = (f"T≈{c:,.0f}" if c is not None and c > r["T_min"] else
                     f"already at T={int(r['T_min'])}, the shortest measured" if c is not None else
                     f"not within T≤{int(r['T_max'])}")
            lines.append(f"  {r['level']:6s} {r['pass']:8s} {r['label'][:44]:44s} {where}"
                         + f" (speedup {r['speedup_at_T_min']:.2f}x at {int(r['T_min'])}, "
                           f"{r['speedup_at_T_max']:.2f}x at {int(r['T_max'])})")
    return "\n".join(lines)


def run(args) -> int:
    """Entry point of ``nsa-viz bench``."""
    df = run_bench(args)
    return 0 if (df["status"] == "ok").any() else 1
