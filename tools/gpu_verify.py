#!/usr/bin/env python
"""`make gpu-verify`: check the GPU code as far as a machine without a GPU can.

    python tools/gpu_verify.py [--out DIR] [--records FILE] [--triton-venv DIR | --also-triton VER]
                               [--skip-triton] [--skip-cuda] [--cache DIR] [--jobs N]

1. Triton, ahead of time. The kernel specializations are recorded, not listed by hand:
   labpal_fast/ops/triton.py appends one JSON line per distinct specialization it launches when
   LABPAL_FAST_RECORD_LAUNCHES=FILE is set. They are recorded by running the test suite (all
   but the tests marked slow; --records FILE takes what `make test-all` recorded instead, as CI
   does) under the Triton interpreter (the recorder writes only when Triton kernels launch, so
   the selection survives renamed test files) plus a small built-in LABPAL run on fp32 and
   fp16 parameters (SGD and NSGD, momentum, accumulation, weight decay on more groups than one
   launch takes).
   Added to what was recorded:
   - bf16: the interpreter cannot run bf16 (numpy has no bf16), so every fp16 specialization is
     also compiled with its fp16 pointers (the parameter / gradient pointers; the fp32 buffers
     stay fp32) as bf16;
   - i64: every specialization with i32 scalars is also compiled with them as i64 (sizes and
     offsets beyond 2^31 elements are launched as int64).
   Each specialization is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda",
   80|90, 32))` to cubin in a separate process that imports labpal_fast.ops.triton WITHOUT
   TRITON_INTERPRET (real JIT functions), with the Triton of this venv and, optionally, of a
   second venv (--triton-venv / --also-triton). Registers and spills come from Triton's own
   `ptxas -v` run (its log is captured), shared memory from the kernel's metadata. Fails on
   any compile error or spill; a spilling specialization is compiled again with other
   num_warps / block sizes and the table says which remove the spills.
2. The CUDA extension. The CUDA build of the pinned torch (the venv's torch version, CUDA
   wheel from PyPI, ~530 MB) is downloaded once and only torch/include and the libraries the
   link needs are kept in a cache (~/.cache/labpal_fast/torch-cuda-VERSION). setup.py is then
   run (`build_ext`) with torch's own BuildExtension, pointed at those headers and libraries
   (it cannot import the CUDA torch here): the exact nvcc / C++ flags a GPU build uses, for
   sm_80 and sm_90, with `-Xptxas -v` (NVCC_APPEND_FLAGS) so the CUDA kernels' registers and
   spills are checked too. The .so's undefined symbols must all resolve against the CUDA
   torch's libraries, the toolkit's libcudart, the system libraries and the interpreter.
3. A summary; exit status 1 on any failure.

What this cannot check: numbers computed on a GPU. benchmarks/gpu_check.py does that on one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sysconfig
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
CUDA_LIBS = ("libc10.so", "libc10_cuda.so", "libtorch.so", "libtorch_cpu.so", "libtorch_cuda.so",
             "libtorch_python.so")
TIMES: "dict[str, float]" = {}
# every test but the slow ones (the install tests: 90 s, and they launch no Triton kernel)
DEFAULT_PYTEST = ["tests", "-m", "not slow"]


def say(msg: str = "") -> None:
    print(msg, flush=True)


def banner(msg: str) -> None:
    say(f"\n=== {msg}")


class Timer:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.t = time.time()
        return self

    def __exit__(self, *exc):
        TIMES[self.name] = TIMES.get(self.name, 0.0) + time.time() - self.t


# ================================================================= 1a. recording (interpreter)
def _interp_env(record_to: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", LABPAL_FAST_RECORD_LAUNCHES=record_to,
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return env


def record(out: str, test_records: "str | None", pytest_args: "list[str]") -> "tuple[list, list]":
    """Returns (records, notes)."""
    notes = []
    files = []
    if test_records:
        say(f"test-suite launches: read from {test_records}")
        if not os.path.exists(test_records):
            notes.append(f"FAIL: {test_records} does not exist: the tests launched no Triton kernel")
        files.append(test_records)
    else:
        path = os.path.join(out, "launches-tests.jsonl")
        if os.path.exists(path):
            os.remove(path)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
               "addopts=--benchmark-disable", *(pytest_args or DEFAULT_PYTEST)]
        say("recording the test suite's launches: TRITON_INTERPRET=1 " + " ".join(cmd[1:]))
        with Timer("record: test suite"):
            proc = subprocess.run(cmd, cwd=ROOT, env=_interp_env(path), capture_output=True,
                                  text=True)
        tail = (proc.stdout.strip().splitlines() or [""])[-1]
        say(f"  pytest exit {proc.returncode}: {tail}")
        if proc.returncode not in (0, 5):
            notes.append(f"pytest exited {proc.returncode} while recording ({tail}); the "
                         "records of the tests that ran are used, failures are `make test`'s")
        with open(os.path.join(out, "record-pytest.log"), "w") as fh:
            fh.write(proc.stdout + proc.stderr)
        files.append(path)
    path = os.path.join(out, "launches-builtin.jsonl")
    if os.path.exists(path):
        os.remove(path)
    say("recording a built-in LABPAL run on fp32 and fp16 parameters (interpreter)")
    with Timer("record: built-in run"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_builtin-run"],
                              cwd=ROOT, env=_interp_env(path), capture_output=True, text=True)
    say("  " + "\n  ".join((proc.stdout + proc.stderr).strip().splitlines()[-12:]))
    if proc.returncode != 0:
        notes.append(f"the built-in run failed (exit {proc.returncode}); see above")
    files.append(path)
    records, seen = [], set()
    for f in files:
        if not os.path.exists(f):
            continue
        for line in open(f):
            line = line.strip()
            if line and line not in seen:
                seen.add(line)
                records.append(dict(json.loads(line), origin="recorded"))
    return records, notes


def builtin_run() -> int:
    """A few LABPAL steps on the Triton backend (interpreter), fp32 and fp16 parameters:
    both modes, momentum on/off, weight decay on more groups than one direction launch takes,
    sizes below and above the streaming kernels' tile (multi-program grids)."""
    import torch
    from labpal_fast import LABPAL
    from labpal_fast.ops import triton as tri

    assert tri._INTERPRETED, "TRITON_INTERPRET=1 must be set before labpal_fast.ops.triton"
    failures = 0
    for dtype in (torch.float32, torch.float16):
        # m = 1: the gradient is the direction's input; m = 2, 3: accumulated micro-batches
        for mode, momentum, m in (("NSGD", 0.0, 1), ("NSGD", 0.9, 2), ("SGD", 0.9, 3)):
            torch.manual_seed(0)
            sizes = (5000, 37, 8, 1, 300, 9)  # 6 groups: > 4 segments, 2 direction launches
            params = [torch.nn.Parameter((0.1 * torch.randn(n)).to(dtype)) for n in sizes]
            decays = (0.01, 0.0, 0.002, 0.0, 0.0, 0.03)
            groups = [{"params": [p], "weight_decay": w} for p, w in zip(params, decays)]
            targets = [torch.randn(n) for n in sizes]
            what = f"{str(dtype)[6:]:8s} {mode} momentum={momentum} m={m}"
            try:
                opt = LABPAL(groups, backend="triton", mode=mode, momentum=momentum,
                             approximation_batches=2, reuse_updates=3, warmup_updates=2,
                             averaging_window=2, noise_factor=1.0,
                             batch_size_schedule=((0, m),), sample_positions=(0.0, 0.05, 0.2))

                def closure():  # a quadratic: valid fits, so training updates happen too
                    return sum(((p.float() - t) ** 2).mean() for p, t in zip(params, targets))

                for _ in range(20):
                    opt.step(closure)
                print(f"built-in run {what}: {opt.updates} updates")
            except Exception as exc:  # report, keep recording the others
                failures += 1
                print(f"built-in run {what}: FAILED {type(exc).__name__}: {exc}")
    print(f"launches: {dict(sorted(tri.LAUNCHES.items()))}")
    return 1 if failures else 0


# ================================================================= 1b. the specializations
def _scalar(t: str) -> bool:
    return not t.startswith("*")


def expand(records: list) -> list:
    """Recorded specializations + bf16 (from fp16) + i64 (from i32) variants, deduplicated."""
    def key(r):
        return json.dumps({k: v for k, v in r.items() if k != "origin"}, sort_keys=True)

    out, seen = [], set()

    def add(r):
        k = key(r)
        if k not in seen:
            seen.add(k)
            out.append(r)

    for r in records:
        add(r)
    for r in list(out):
        if any(t == "*fp16" for t in r["signature"].values()):
            sig = {n: ("*bf16" if t == "*fp16" else t) for n, t in r["signature"].items()}
            add(dict(r, signature=sig, origin="bf16 from fp16"))
    for r in list(out):
        if any(t == "i32" for t in r["signature"].values()):
            sig = {n: ("i64" if t == "i32" else t) for n, t in r["signature"].items()}
            add(dict(r, signature=sig, origin=("bf16+" if r["origin"] != "recorded" else "")
                     + "i64 from i32"))
    return out


def describe(r: dict) -> "tuple[str, str]":
    """(dtypes, flags) of a specialization, for the table."""
    ptrs = [t[1:] for t in r["signature"].values() if t.startswith("*")]
    dtypes = "+".join(sorted(set(ptrs), key=ptrs.index)) or "-"
    flags = []
    for k, v in sorted(r["constexprs"].items()):
        if isinstance(v, bool):
            if v:
                flags.append(k)
        else:
            flags.append(f"{k}={v}")
    if any(t == "i64" for t in r["signature"].values()):
        flags.append("i64")
    return dtypes, " ".join(flags) or "-"


# ================================================================= 1c. compile (separate process)
_PTXAS_LOGS: list = []


def _install_ptxas_log_hook():
    """Keep the log of the `ptxas -v` run Triton makes for each cubin (Triton deletes it)."""
    import triton.backends.nvidia.compiler as nvc

    real = subprocess

    class _Proxy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def run(cmd, *args, **kwargs):
            result = real.run(cmd, *args, **kwargs)
            if isinstance(cmd, (list, tuple)) and "ptxas" in os.path.basename(str(cmd[0])):
                name = getattr(kwargs.get("stderr"), "name", None)
                if isinstance(name, str) and os.path.exists(name):
                    with open(name) as fh:
                        _PTXAS_LOGS.append(fh.read())
            return result

    nvc.subprocess = _Proxy()


def _ptxas_fallback(ptx: str) -> str:
    """Run Triton's bundled ptxas -v on the PTX ourselves (when the hook caught nothing)."""
    import triton
    arch = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        p = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    return p.stdout + p.stderr


def parse_ptxas(log: str) -> dict:
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    stack = [int(x) for x in re.findall(r"(\d+) bytes stack frame", log)]
    smem = [int(x) for x in re.findall(r"(\d+) bytes smem", log)]
    return {"regs": max(regs) if regs else None, "spill_stores": max(stores, default=0),
            "spill_loads": max(loads, default=0), "stack": max(stack, default=0),
            "static_smem": max(smem, default=0), "parsed": bool(regs)}


_MOD = None


def _worker_init():
    global _MOD
    import warnings
    warnings.filterwarnings("ignore")
    os.environ.pop("TRITON_INTERPRET", None)
    import importlib
    _MOD = importlib.import_module("labpal_fast.ops.triton")
    _install_ptxas_log_hook()


def _compile_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    r, arch = job["spec"], job["arch"]
    res = {"index": job["index"], "arch": arch, "num_warps": r["num_warps"],
           "constexprs": r["constexprs"]}
    t0 = time.time()
    try:
        fn = getattr(_MOD, r["kernel"], None)
        if fn is None:
            raise LookupError(f"labpal_fast.ops.triton has no kernel {r['kernel']} (stale record?)")
        signature = {}
        for name in fn.arg_names:
            if name in r["signature"]:
                t = r["signature"][name]
                signature[name] = "u1" if t == "i1" else t  # Triton's type of a bool scalar
            elif name in r["constexprs"]:
                signature[name] = "constexpr"
            else:
                raise LookupError(f"{r['kernel']}: argument {name} is not in the record "
                                  "(the kernel changed since it was recorded)")
        constexprs = {(fn.arg_names.index(k),): v for k, v in r["constexprs"].items()}
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
                 for n in r["divisible_by_16"] if signature.get(n, "constexpr") != "constexpr"}
        del _PTXAS_LOGS[:]
        kernel = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": r["num_warps"]})
        log = "\n".join(_PTXAS_LOGS)
        info = parse_ptxas(log)
        if not info["parsed"]:
            log = _ptxas_fallback(kernel.asm["ptx"])
            info = parse_ptxas(log)
            info["ptxas"] = "own run"
        res.update(info, ok=True, shared=int(kernel.metadata.shared),
                   cubin_bytes=len(kernel.asm["cubin"]), ptxas_log=log.strip()[-800:])
        if not info["parsed"]:
            res.update(ok=False, error="could not read registers from ptxas -v:\n" + log[-2000:])
    except Exception as exc:  # a compile error is a finding, not a crash of this tool
        res.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-4000:])
    res["seconds"] = round(time.time() - t0, 2)
    return res


def compile_main(specs_path: str, out_path: str, jobs: int, archs: "list[int]") -> int:
    """Runs in the Python whose Triton is checked (no TRITON_INTERPRET)."""
    import concurrent.futures
    import multiprocessing

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu-verify-triton-cache-")
    sys.path.insert(0, ROOT)
    import triton
    specs = json.load(open(specs_path))
    work = [{"index": i, "arch": a, "spec": s} for i, s in enumerate(specs) for a in archs]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=ctx,
                                                initializer=_worker_init) as pool:
        results = list(pool.map(_compile_one, work, chunksize=1))
    _worker_init()
    jit = sorted(n for n, v in vars(_MOD).items() if isinstance(v, triton.runtime.JITFunction))
    json.dump({"triton": triton.__version__, "python": sys.executable, "results": results,
               "jit_functions": jit}, open(out_path, "w"), indent=1)
    shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    return 0


def run_compile(python: str, specs: list, out: str, tag: str, jobs: int) -> dict:
    specs_path = os.path.join(out, f"specs-{tag}.json")
    json.dump(specs, open(specs_path, "w"), indent=1)
    res_path = os.path.join(out, f"triton-{tag}.json")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "LABPAL_FAST_RECORD_LAUNCHES")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default today; quiets 3.9's warning
    proc = subprocess.run([python, os.path.abspath(__file__), "_compile", specs_path, res_path,
                           str(jobs), ",".join(map(str, ARCHS))], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.exists(res_path):
        return {"error": (proc.stdout + proc.stderr)[-4000:], "results": []}
    return json.load(open(res_path))


def triton_report(specs: list, data: dict, tag: str) -> "list[str]":
    """Prints the per-kernel table; returns the failures."""
    failures = []
    if "error" in data:
        return [f"[{tag}] the compile step itself failed:\n{data['error']}"]
    by = {}
    for res in data["results"]:
        by.setdefault(res["index"], {})[res["arch"]] = res
    # one row per (kernel, dtypes, flags, warps, origin); alignment variants folded (worst shown)
    rows = {}
    for i, spec in enumerate(specs):
        dtypes, flags = describe(spec)
        key = (spec["kernel"], dtypes, flags, spec["num_warps"], spec["origin"])
        row = rows.setdefault(key, {"n": 0, **{a: None for a in ARCHS}})
        row["n"] += 1
        for arch in ARCHS:
            res = by.get(i, {}).get(arch)
            if res is None:
                failures.append(f"[{tag}] {spec['kernel']} sm_{arch}: no result")
                continue
            if not res["ok"]:
                failures.append(f"[{tag}] {spec['kernel']} {dtypes} {flags} sm_{arch}: "
                                f"{res['error']}")
                row[arch] = "ERR"
                continue
            spill = res["spill_stores"] + res["spill_loads"]
            if spill:
                failures.append(f"[{tag}] {spec['kernel']} {dtypes} {flags} w{spec['num_warps']} "
                                f"sm_{arch}: {res['regs']} registers, spills {res['spill_stores']} "
                                f"B stored / {res['spill_loads']} B loaded")
            old = row[arch]
            if old == "ERR":
                continue
            if old is None or (spill, res["regs"]) > (old["spill_stores"] + old["spill_loads"],
                                                     old["regs"]):
                row[arch] = res
    say(f"Triton {data.get('triton')} ({data.get('python')}): {len(specs)} specializations x "
        f"{len(ARCHS)} targets")
    head = (f"{'kernel':22s} {'dtypes':16s} {'flags':46s} {'w':>2s} {'#':>2s} {'origin':18s}" +
            "".join(f" | sm_{a}: regs spill smem" for a in ARCHS))
    say(head)
    say("-" * len(head))
    for key in sorted(rows, key=lambda k: (k[0], k[4], k[1], k[2])):
        kernel, dtypes, flags, warps, origin = key
        row = rows[key]
        cells = []
        for a in ARCHS:
            res = row[a]
            if res is None or res == "ERR":
                cells.append(f" | {'ERROR' if res == 'ERR' else '-':>22s}")
            else:
                spill = res["spill_stores"] + res["spill_loads"]
                cells.append(f" | {res['regs']:>11d} {spill:>5d} {res['shared']:>4d}")
        say(f"{kernel:22s} {dtypes:16s} {flags:46s} {warps:>2d} {row['n']:>2d} {origin:18s}"
            + "".join(cells))
    recorded = {s["kernel"] for s in specs}
    others = [n for n in data.get("jit_functions", []) if n not in recorded]
    if others:
        say(f"@triton.jit functions never launched (device helpers, or kernels no test "
            f"and no built-in run launches): {', '.join(others)}")
    secs = [r["seconds"] for r in data["results"]]
    say(f"(# = alignment variants folded into the row, worst shown; spill = bytes stored + "
        f"loaded; smem = Triton's shared memory in bytes; {len(secs)} compiles, "
        f"{sum(secs):.0f} s of compile time)")
    return failures


def sweep_spills(python: str, specs: list, data: dict, out: str, jobs: int,
                 kernels: "list[str]" = (), tag: str = "venv") -> None:
    """For each spilling (kernel, flags), and each (kernel, flags) of `kernels`, compile copies
    with other num_warps / block sizes: which of them would remove the spills."""
    if "error" in data:
        return
    spilled, worst = {}, {}
    for res in data["results"]:
        spec = specs[res["index"]]
        if not res.get("ok") or spec["origin"] != "recorded":
            continue
        dtypes, flags = describe(spec)
        if res["spill_stores"] + res["spill_loads"]:
            spilled.setdefault((spec["kernel"], dtypes, flags), spec)
        elif spec["kernel"] in kernels:  # the specialization with the most registers per dtype
            key = (spec["kernel"], dtypes)
            if key not in worst or res["regs"] > worst[key][0]:
                worst[key] = (res["regs"], spec)
    for (kernel, dtypes), (_, spec) in worst.items():
        spilled.setdefault((kernel, dtypes, describe(spec)[1]), spec)
    if not spilled:
        return
    trials = []
    for (kernel, _, _), spec in spilled.items():
        blocks = [k for k, v in spec["constexprs"].items()
                  if isinstance(v, int) and not isinstance(v, bool) and v >= 128 and not v & (v - 1)]
        sizes = [None] + [(k, spec["constexprs"][k] * f) for k in blocks for f in (0.25, 0.5, 2)]
        for warps in (4, 8, 16):
            for size in sizes:
                cx = dict(spec["constexprs"])
                if size:
                    cx[size[0]] = int(size[1])
                trials.append(dict(spec, constexprs=cx, num_warps=warps, origin="sweep"))
    banner(f"spill sweep ({tag}): {len(trials)} variants of {len(spilled)} specializations "
           "(modified copies, not what the optimizer launches)")
    with Timer(f"triton: spill sweep ({tag})"):
        res = run_compile(python, trials, out, f"sweep-{tag}", jobs)
    if "error" in res:
        say(res["error"])
        return
    by = {}
    for r in res["results"]:
        by.setdefault(r["index"], {})[r["arch"]] = r
    for i, spec in enumerate(trials):
        dtypes, flags = describe(spec)
        cells = []
        for a in ARCHS:
            r = by.get(i, {}).get(a)
            if r is None or not r["ok"]:
                cells.append(f"sm_{a}: ERROR " + ("" if r is None else r["error"].splitlines()[0][:60]))
            else:
                cells.append(f"sm_{a}: {r['regs']:>3d} regs, spill {r['spill_stores']:>4d}+"
                             f"{r['spill_loads']:<4d} B, smem {r['shared']:>5d}")
        say(f"  {spec['kernel']:20s} {dtypes:10s} {flags:46s} w{spec['num_warps']:<2d} | "
            + " | ".join(cells))


def second_triton_venv(version: str, cache: str) -> str:
    """A venv with triton==VERSION that borrows everything else (torch, numpy) from this venv."""
    venv = os.path.join(cache, f"triton-{version}-venv")
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, ".ready")
    if not os.path.exists(stamp):
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        site = subprocess.check_output([py, "-c", "import sysconfig; "
                                        "print(sysconfig.get_paths()['purelib'])"], text=True).strip()
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        site, f"triton=={version}"], check=True)
        open(stamp, "w").close()
    # written on every run, not only when the venv is made: the cache outlives the checkout
    # whose venv it borrows from (a cached .pth pointing at a removed clone finds no torch)
    site = subprocess.check_output([py, "-c", "import sysconfig; "
                                    "print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    mine = sysconfig.get_paths()["purelib"]
    # appended to sys.path after the venv's own site-packages: its triton comes first
    with open(os.path.join(site, "zz_borrow_main_venv.pth"), "w") as fh:
        fh.write(mine + "\n")
    return py


# ================================================================= 2. the CUDA extension
def cache_root(arg: "str | None") -> str:
    if arg:
        return os.path.abspath(arg)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "labpal_fast")


def cuda_home() -> "str | None":
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:  # follow links and one-line wrapper scripts (exec /usr/local/cuda-X/bin/nvcc "$@")
        nvcc = os.path.realpath(nvcc)
        try:
            m = re.search(r"exec\s+(\S+/bin/nvcc)\b", open(nvcc, errors="ignore").read(4096))
        except OSError:
            m = None
        if m:
            nvcc = m.group(1)
        return os.path.dirname(os.path.dirname(nvcc))
    return None


def ensure_cuda_torch(version: str, cache: str) -> str:
    """The CUDA torch's include/ and link libraries, downloaded and extracted once."""
    root = os.path.join(cache, f"torch-cuda-{version}")
    stamp = os.path.join(root, "READY.json")
    if os.path.exists(stamp):
        info = json.load(open(stamp))
        say(f"CUDA torch {info.get('version')} cached in {root} (downloaded in "
            f"{info.get('download_s')} s, extracted in {info.get('extract_s')} s)")
        return root
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"torch-cuda-{version}-", dir=cache)
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--no-cache-dir",
               "--disable-pip-version-check",
               "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
               "--index-url", os.environ.get("GPU_VERIFY_INDEX_URL", "https://pypi.org/simple"),
               "-d", tmp, f"torch=={version}"]
        cert = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
        if os.path.exists(cert):
            cmd[4:4] = ["--cert", cert]
        say(f"downloading the CUDA build of torch {version} (~530 MB, once): {' '.join(cmd[3:])}")
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        download_s = round(time.time() - t, 1)
        TIMES["cuda: download wheel"] = download_s
        wheel = glob.glob(os.path.join(tmp, "torch-*.whl"))[0]
        say(f"  {os.path.basename(wheel)}: {os.path.getsize(wheel) / 2**20:.0f} MiB in "
            f"{download_s} s")
        t = time.time()
        dest = os.path.join(tmp, "x")
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist()
                     if n.startswith("torch/include/") or n == "torch/version.py"
                     or n in {f"torch/lib/{lib}" for lib in CUDA_LIBS}]
            missing = [lib for lib in CUDA_LIBS if f"torch/lib/{lib}" not in names]
            if missing:
                raise RuntimeError(f"{os.path.basename(wheel)} has no {missing}: not a CUDA build?")
            for n in names:
                z.extract(n, dest)
        extract_s = round(time.time() - t, 1)
        TIMES["cuda: extract"] = extract_s
        ns = {}
        exec(open(os.path.join(dest, "torch", "version.py")).read(), ns)
        if not ns.get("cuda"):
            raise RuntimeError(f"{os.path.basename(wheel)} is not a CUDA build")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
        say(f"  extracted {len(names)} files ({size / 2**20:.0f} MiB) in {extract_s} s; "
            f"torch {ns['__version__']}, CUDA {ns['cuda']}")
        shutil.rmtree(root, ignore_errors=True)
        os.rename(dest, root)
        json.dump({"version": ns["__version__"], "cuda": ns["cuda"], "wheel": os.path.basename(wheel),
                   "download_s": download_s, "extract_s": extract_s}, open(stamp, "w"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def build_ext_main(torch_root: str, build_dir: str) -> int:
    """Runs setup.py build_ext with torch's BuildExtension aimed at the CUDA torch's files.
    Runs in the venv's Python (CPU torch imported; the CUDA torch is never imported)."""
    sys.path.insert(0, ROOT)
    import runpy

    import torch
    from torch.utils import cpp_extension as ce

    ns = {}
    exec(open(os.path.join(torch_root, "torch", "version.py")).read(), ns)
    cpu_torch = os.path.dirname(os.path.abspath(torch.__file__))
    cuda_torch = os.path.join(torch_root, "torch")
    home = cuda_home()
    if home is None:
        print("no CUDA toolkit (nvcc) found", file=sys.stderr)
        return 2

    def swap(paths):
        return [cuda_torch + p[len(cpu_torch):] if p.startswith(cpu_torch) else p for p in paths]

    include_paths, library_paths = ce.include_paths, ce.library_paths
    ce.include_paths = lambda *a, **k: swap(include_paths(*a, **k))
    ce.library_paths = lambda *a, **k: swap(library_paths(*a, **k))
    ce.CUDA_HOME = home
    torch.version.cuda = ns["cuda"]  # what setup.py and BuildExtension look at
    print(f"torch BuildExtension of {torch.__version__} with the headers and libraries of "
          f"{ns['__version__']} ({cuda_torch}); CUDA_HOME={home}; "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}; "
          f"NVCC_APPEND_FLAGS={os.environ.get('NVCC_APPEND_FLAGS')}", flush=True)
    sys.argv = ["setup.py", "build_ext", "--force", "--build-temp",
                os.path.join(build_dir, "temp"), "--build-lib", os.path.join(build_dir, "lib")]
    os.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    return 0


def demangle(names: "list[str]") -> "list[str]":
    try:
        return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                              text=True).stdout.splitlines()
    except OSError:
        return names


def parse_nvcc_ptxas(log: str) -> list:
    """Per (kernel, arch): registers, spills, from nvcc -Xptxas -v."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "regs": None, "spill_stores": 0,
                   "spill_loads": 0, "stack": 0, "smem": 0}
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    for entry, name in zip(out, demangle([e["mangled"] for e in out])):
        entry["name"] = name
    return out


def _nm(path: str, defined: bool) -> "set[str]":
    p = subprocess.run(["nm", "-D", "--defined-only" if defined else "--undefined-only", path],
                       capture_output=True, text=True)
    syms = set()
    for line in p.stdout.splitlines():
        parts = line.split()
        if not parts:
            continue
        kind, name = parts[-2], parts[-1]
        if not defined and kind in ("w", "v"):
            continue  # weak: may stay unresolved
        syms.add(name.split("@")[0])
    return syms


def check_symbols(so: str, torch_root: str, home: str) -> "tuple[list, list]":
    """(failures, notes): every undefined symbol of the .so resolves somewhere."""
    failures, notes = [], []
    lib_dirs = [os.path.join(torch_root, "torch", "lib"), os.path.join(home, "lib64")]
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        lib_dirs + [p for p in [os.environ.get("LD_LIBRARY_PATH")] if p]))
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]",
                        subprocess.run(["readelf", "-d", so], capture_output=True,
                                       text=True).stdout)
    ldd = subprocess.run(["ldd", so], capture_output=True, text=True, env=env).stdout
    found, missing = {}, []
    for line in ldd.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line) or re.match(r"\s*((/\S+))\s+\(0x", line)
        if m:  # "name => path (addr)", "name => not found", or "/path (addr)" (the loader)
            if m.group(2) == "not":
                missing.append(m.group(1))
            else:
                found[m.group(1)] = m.group(2)
    say(f"NEEDED: {', '.join(needed)}")
    direct_missing = [n for n in needed if n in missing]
    if direct_missing:
        failures.append(f"libraries the .so needs that are not found: {direct_missing}")
    if missing:
        notes.append("not found by ldd (expected without a driver and the nvidia-* wheels that "
                     f"the CUDA torch's own libraries load): {', '.join(sorted(set(missing)))}")
    undefined = _nm(so, defined=False)
    defined = set()
    for path in set(found.values()):
        defined |= _nm(path, defined=True)
    py = os.path.realpath(sys.executable)
    defined |= _nm(py, defined=True)
    for lib in glob.glob(os.path.join(os.path.dirname(os.path.dirname(py)), "lib",
                                      "libpython3*.so*")):
        defined |= _nm(lib, defined=True)
    unresolved = sorted(undefined - defined)
    say(f"{len(undefined)} undefined symbols (strong) in {os.path.basename(so)}; resolved "
        f"against {len(found)} libraries + the interpreter: {len(undefined) - len(unresolved)}")
    if unresolved:
        dm = demangle(unresolved)
        failures.append(f"{len(unresolved)} unresolved symbols:\n    " + "\n    ".join(dm[:40]))
    if "PyInit__C" not in _nm(so, defined=True):
        failures.append("the .so does not define PyInit__C")
    return failures, notes


def cuda_ext(out: str, cache: str, version: str, jobs: int) -> "tuple[list, list]":
    failures, notes = [], []
    home = cuda_home()
    if home is None:
        return ["no CUDA toolkit (nvcc) found: cannot build the CUDA extension"], notes
    with Timer("cuda: download+extract (when not cached)"):
        torch_root = ensure_cuda_torch(version, cache)
    build_dir = os.path.join(out, "ext")
    shutil.rmtree(build_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LABPAL_FAST_NO_EXT",
                                                            "LABPAL_FAST_NO_CUDA")}
    env.update(TORCH_CUDA_ARCH_LIST=";".join(f"{a // 10}.{a % 10}" for a in ARCHS),
               NVCC_APPEND_FLAGS=(env.get("NVCC_APPEND_FLAGS", "") + " -Xptxas -v").strip(),
               MAX_JOBS=str(jobs), CUDA_HOME=home)
    say(f"building csrc/ with torch's BuildExtension (setup.py build_ext) for "
        f"{env['TORCH_CUDA_ARCH_LIST']}")
    with Timer("cuda: compile + link"):
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "_build-ext", torch_root,
                               build_dir], cwd=ROOT, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    with open(os.path.join(out, "ext-build.log"), "w") as fh:
        fh.write(log)
    cmds = [l for l in log.splitlines() if re.match(r"\[\d+/\d+\] ", l) or " -shared " in l]
    for c in cmds:  # the commands BuildExtension ran (ninja's, then the link)
        say("  $ " + c)
    sos = glob.glob(os.path.join(build_dir, "lib", "labpal_fast", "_C*.so"))
    if proc.returncode != 0 or not sos or "failed" in log and "building labpal_fast._C failed" in log:
        errors = [l for l in log.splitlines() if re.search(r"error|failed|Error", l)]
        failures.append("the CUDA extension did not build (log: "
                        f"{os.path.join(out, 'ext-build.log')}):\n    "
                        + "\n    ".join((errors or log.splitlines())[-25:]))
        return failures, notes
    if "with the headers and libraries of" not in log or "CPU + CUDA" not in log:
        failures.append("setup.py did not build the CUDA kernels (no 'CPU + CUDA' in its output)")
    so = sos[0]
    say(f"built {os.path.relpath(so, ROOT)} ({os.path.getsize(so) / 2**20:.1f} MiB)")
    warned = [l for l in log.splitlines() if re.search(r"\bwarning\b", l) and "ptxas" not in l
              and "Deprecat" not in l]
    if warned:  # -Wall of the host compiler, nvcc's front end: reported, not fatal
        notes.append(f"{len(warned)} compiler warning lines (ext-build.log):\n    "
                     + "\n    ".join(warned[:10]))
    kernels = parse_nvcc_ptxas(log)
    if not kernels:
        failures.append("no ptxas -v figures in nvcc's output")
    say(f"\n{'CUDA kernel':78s} {'arch':6s} {'regs':>4s} {'spill st/ld':>11s} {'stack':>5s} "
        f"{'smem':>6s}")
    for k in sorted(kernels, key=lambda k: (k["name"], k["arch"])):
        say(f"{k['name'][:78]:78s} {k['arch']:6s} {k['regs'] or 0:>4d} "
            f"{k['spill_stores']:>5d}/{k['spill_loads']:<5d} {k['stack']:>5d} {k['smem']:>6d}")
        if k["spill_stores"] or k["spill_loads"]:
            failures.append(f"CUDA kernel {k['name']} {k['arch']}: {k['regs']} registers, spills "
                            f"{k['spill_stores']} B stored / {k['spill_loads']} B loaded")
    archs = sorted({k["arch"] for k in kernels})
    want = [f"sm_{a}" for a in ARCHS]
    if archs != want:
        failures.append(f"kernels compiled for {archs}, expected {want}")
    with Timer("cuda: symbol check"):
        f2, n2 = check_symbols(so, torch_root, home)
    return failures + f2, notes + n2


# ================================================================= main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "gpu-verify"),
                    help="records, compile results, logs, the extension build (default %(default)s)")
    ap.add_argument("--records", help="use these test-suite launch records (a jsonl written with "
                    "LABPAL_FAST_RECORD_LAUNCHES during `make test`) instead of running the tests")
    ap.add_argument("--pytest-args", nargs="*", help="what to record (default: %s)"
                    % " ".join(DEFAULT_PYTEST))
    ap.add_argument("--triton-venv", action="append", default=[],
                    help="also compile with the Triton of this venv (repeatable)")
    ap.add_argument("--also-triton", action="append", default=[], metavar="VERSION",
                    help="also compile with triton==VERSION, in a venv made in the cache (pip "
                    "installs only triton; torch etc. come from this venv)")
    ap.add_argument("--skip-triton", action="store_true")
    ap.add_argument("--skip-cuda", action="store_true")
    ap.add_argument("--no-sweep", action="store_true", help="do not sweep spilling kernels")
    ap.add_argument("--sweep", action="append", default=[], metavar="KERNEL",
                    help="sweep num_warps / block sizes of this kernel even when it does not spill")
    ap.add_argument("--cache", help="download cache (default ~/.cache/labpal_fast)")
    ap.add_argument("--torch-version", help="CUDA torch to build against (default: this venv's)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    start = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    cache = cache_root(args.cache)
    failures, notes = [], []

    if not args.skip_triton:
        banner("Triton: record the launched specializations (interpreter)")
        records, n = record(out, args.records, args.pytest_args)
        failures += [x[6:] for x in n if x.startswith("FAIL: ")]
        notes += [x for x in n if not x.startswith("FAIL: ")]
        if not records:
            failures.append("no Triton launch was recorded (is triton installed? do the Triton "
                            "tests still launch through labpal_fast.ops.triton._launch?)")
        else:
            specs = expand(records)
            kinds = {}
            for s in specs:
                kinds[s["origin"]] = kinds.get(s["origin"], 0) + 1
            say(f"{len(records)} recorded specializations of "
                f"{len({r['kernel'] for r in records})} kernels; compiling {len(specs)}: "
                + ", ".join(f"{v} {k}" for k, v in kinds.items()))
            notes.append("bf16 specializations are synthesized from the fp16 ones (fp16 pointers "
                         "as bf16): the interpreter cannot run bf16")
            pythons = [("venv", sys.executable)]
            pythons += [(f"venv:{os.path.basename(os.path.normpath(v))}",
                         os.path.join(os.path.abspath(v), "bin", "python"))
                        for v in args.triton_venv]
            for version in args.also_triton:
                with Timer(f"triton {version}: make venv"):
                    pythons.append((f"triton-{version}", second_triton_venv(version, cache)))
            for tag, python in pythons:
                banner(f"Triton: compile for sm_{', sm_'.join(map(str, ARCHS))} ({tag})")
                with Timer(f"triton: compile ({tag})"):
                    data = run_compile(python, specs, out, tag, args.jobs)
                f = triton_report(specs, data, tag)
                failures += f
                if f and not args.no_sweep or args.sweep:
                    sweep_spills(python, specs, data, out, args.jobs, args.sweep, tag)

    if not args.skip_cuda:
        banner("CUDA extension: build against the CUDA torch's headers and libraries")
        import torch
        version = args.torch_version or torch.__version__.split("+")[0]
        try:
            f, n = cuda_ext(out, cache, version, args.jobs)
        except Exception as exc:
            f, n = [f"CUDA extension check broke: {type(exc).__name__}: {exc}"], []
        failures += f
        notes += n

    banner("summary")
    for k, v in TIMES.items():
        say(f"  {k:42s} {v:7.1f} s")
    say(f"  {'total':42s} {time.time() - start:7.1f} s")
    for n in notes:
        say(f"note: {n}")
    if failures:
        say(f"\nFAILED ({len(failures)}):")
        for f in failures:
            say(f"  - {f}")
        return 1
    say("\ngpu-verify: OK")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_builtin-run":
        sys.path.insert(0, ROOT)
        sys.exit(builtin_run())
    if len(sys.argv) > 1 and sys.argv[1] == "_compile":
        sys.exit(compile_main(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                              [int(a) for a in sys.argv[5].split(",")]))
    if len(sys.argv) > 1 and sys.argv[1] == "_build-ext":
        sys.exit(build_ext_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
