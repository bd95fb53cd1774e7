"""`make gpu-check`: build the CUDA backend, run its tests and benchmark it against PyTorch, in one table.

Meant for a machine with an NVIDIA GPU and nothing fetched from the network: it uses the python3 it is run
with (PyTorch, transformers, numpy, pytest, cmake, ninja, pybind11 as the device image has them), builds
realizar's two modules with plain CMake into build/gpu, stages the package there and runs everything from
that stage. Random-weight SmolLM2-135M-shaped and TinyLlama-1.1B-shaped llama models are written with our GGUF
writer and quantizer in Q4_1, Q4_K and Q8_0.

Every section runs in its own process with a time limit, so a failing or hanging section costs only its own
row; the whole run keeps to a budget (default 330 s) and always ends with the table. Results also go to
$OUT/gpu_check.json (or --out) when set.

    python3 benchmarks/gpu_check.py [--budget 330] [--skip-build] [--skip-tests] [--quick] [--no-torch] [--no-serve]

Columns: decode = single-stream greedy decode (CUDA graphs), % roof = decode tok/s over the HBM roofline
(measured copy bandwidth / weight bytes read per token), eager = the same decode without CUDA graphs,
agg@64 = aggregate decode tok/s of 64 concurrent sequences, xdec = agg@64 / decode, prefill = tok/s of a
512-token prompt; torch = PyTorch fp16 LlamaForCausalLM (random weights, greedy generate) on the same shape.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "gpu"
STAGE = BUILD / "stage"
MODELS = {
    # name: (n_vocab, n_embd, n_layer, n_head, n_head_kv, n_ff, tied)
    "smollm2-135m": (49152, 576, 30, 9, 3, 1536, True),
    "tinyllama-1.1b": (32000, 2048, 22, 32, 4, 5632, False),
}
TYPES = ("Q4_1", "Q4_K", "Q8_0")
T0 = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - T0


def log(msg: str) -> None:
    print(f"[gpu-check {elapsed():6.1f}s] {msg}", flush=True)


def run(cmd: list[str], timeout: float, env: dict | None = None, cwd: Path = ROOT) -> tuple[int, str]:
    """Runs cmd; returns (status, combined output). Status 124 on timeout."""
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=max(1.0, timeout))
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f}s)"
    except OSError as e:
        return 127, str(e)


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# ---------------------------------------------------------------------------------------------------------
# environment and build
# ---------------------------------------------------------------------------------------------------------

def gpu_present() -> tuple[bool, str]:
    if shutil.which("nvidia-smi"):
        st, out = run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,driver_version",
                       "--format=csv,noheader"], 30)
        if st == 0 and out.strip():
            return True, out.strip()
    try:
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            return True, torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - torch missing or broken: no answer from it
        pass
    return False, "no NVIDIA GPU visible (nvidia-smi found none and PyTorch reports no CUDA device)"


def cuda_archs(gpu_line: str) -> str:
    """The GPU's own architecture (fast build); CMake's default list when unknown."""
    try:
        cc = gpu_line.splitlines()[0].split(",")[1].strip()
        major, minor = cc.split(".")
        return f"{int(major)}{int(minor)}"
    except (IndexError, ValueError):
        return "80-real;90-real"


def build(archs: str, timeout: float) -> tuple[bool, str]:
    py = sys.executable
    st, out = run([py, "-m", "pybind11", "--cmakedir"], 60)
    if st != 0:
        return False, "pybind11 is not importable by " + py + "\n" + tail(out)
    pybind_dir = out.strip().splitlines()[-1]
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    t = time.monotonic()
    st, out = run(["cmake", "-S", str(ROOT), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release",
                   "-DREALIZAR_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-Dpybind11_DIR={pybind_dir}",
                   f"-DPython_EXECUTABLE={py}"], timeout)
    if st != 0:
        return False, "cmake configure failed\n" + tail(out, 40)
    st, out = run(["cmake", "--build", str(BUILD), "--parallel", str(os.cpu_count() or 8), "--target", "_core",
                   "_cuda"], timeout - (time.monotonic() - t))
    if st != 0:
        return False, "build failed\n" + tail(out, 40)
    # stage: the pure-Python package plus the two compiled modules
    pkg = STAGE / "realizar"
    if pkg.exists():
        shutil.rmtree(pkg)
    shutil.copytree(ROOT / "python" / "realizar", pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    mods = [p for p in BUILD.glob("_c*.so") if p.name.startswith(("_core.", "_cuda."))]
    for p in mods:
        shutil.copy2(p, pkg / p.name)
    names = sorted(p.name.split(".")[0] for p in mods)
    if names != ["_core", "_cuda"]:
        return False, f"built modules not found in {BUILD} (found {names})"
    return True, f"built for sm_{archs} in {time.monotonic() - t:.0f}s"


def staged_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(STAGE) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("REALIZAR_THREADS", str(os.cpu_count() or 8))
    return env


# ---------------------------------------------------------------------------------------------------------
# one benchmark row (child process): our model, or PyTorch's
# ---------------------------------------------------------------------------------------------------------

def bench_ours(model: str, wtype: str, quick: bool) -> dict:
    import numpy as np

    from realizar import cuda_backend as cb

    V, E, L, H, KV, F, tied = MODELS[model]
    shape = cb.LlamaShape(n_vocab=V, n_embd=E, n_layer=L, n_head=H, n_head_kv=KV, n_ff=F, n_ctx=2048, tied=tied)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"realizar-gpu-check-{model}-{wtype}.gguf"
    t = time.monotonic()
    cb.random_llama_gguf(path, shape, wtype, seed=1, share_layers=True, fast_random=True)
    r = {"gguf_s": time.monotonic() - t, "file_mb": path.stat().st_size / 1e6}
    t = time.monotonic()
    m = cb.CudaModel.from_gguf(path, n_ctx=2048, max_step_tokens=2048)
    r["load_s"] = time.monotonic() - t
    r["bytes_per_token"] = m.bytes_per_token
    rng = np.random.default_rng(0)

    # single stream: 32-token prompt, then greedy decode in CUDA graphs
    n_dec = 64 if quick else 128
    prompt = rng.integers(0, V, 32).tolist()
    m.generate_greedy(prompt, 8)  # warm-up (graph capture)
    best = 0.0
    for _ in range(2):
        cache, table = m._cache_for(32 + n_dec + 1)
        first = m.prefill(cache, prompt, table)
        t = time.monotonic()
        m.decode_greedy(cache, [first], [32], [table], n_dec)
        best = max(best, n_dec / (time.monotonic() - t))
    r["decode_tps"] = best
    # the same without graphs, for reference
    cache, table = m._cache_for(32 + 65)
    first = m.prefill(cache, prompt, table)
    t = time.monotonic()
    m.decode_greedy(cache, [first], [32], [table], 32, use_graph=False)
    r["decode_eager_tps"] = 32 / (time.monotonic() - t)

    # 64 concurrent sequences: prompts of 32 in one batched step, then 64 decode steps together
    B, n_agg = 64, (16 if quick else 32)
    blocks_per_seq = -(-(32 + n_agg + 1) // 16)
    cache = m.new_kv_cache(B * blocks_per_seq, 16)
    tables = [np.arange(b * blocks_per_seq, (b + 1) * blocks_per_seq, dtype=np.int32) for b in range(B)]
    prompts = rng.integers(0, V, (B, 32)).astype(np.int32)
    t = time.monotonic()
    nxt = m.core.forward_sample(cache, prompts.reshape(-1), np.full(B, 32, np.int32), np.zeros(B, np.int32), tables,
                                np.arange(31, B * 32, 32, dtype=np.int32), np.zeros(B, np.float32),
                                np.zeros(B, np.int32), np.ones(B, np.float32), np.zeros(B, np.float32),
                                np.zeros(B, np.float32))
    r["batch_prefill_tps"] = B * 32 / (time.monotonic() - t)
    m.decode_greedy(cache, nxt, np.full(B, 32), tables, 2)  # warm-up (capture)
    t = time.monotonic()
    m.decode_greedy(cache, nxt, np.full(B, 34), tables, n_agg)
    r["agg64_tps"] = B * n_agg / (time.monotonic() - t)

    # prefill: one 512-token prompt, logits of its last token
    toks = rng.integers(0, V, 512).astype(np.int32)
    cache, table = m._cache_for(512)
    one = np.array([512], np.int32)
    z = np.array([0], np.int32)
    last = np.array([511], np.int32)
    m.core.forward(cache, toks, one, z, [table], last)
    times = []
    for _ in range(3):
        t = time.monotonic()
        m.core.forward(cache, toks, one, z, [table], last)
        times.append(time.monotonic() - t)
    r["prefill_tps"] = 512 / min(times)
    path.unlink(missing_ok=True)
    return r


def bench_serve(model: str, wtype: str, quick: bool) -> dict:
    """A real `realizar serve --device cuda` process on loopback, driven by `realizar loadtest`: the completions
    scenario (48 clients at once, 32 greedy tokens each, as issue 5's CPU figure) and one client alone."""
    import socket
    import urllib.request

    from realizar import cuda_backend as cb

    V, E, L, H, KV, F, tied = MODELS[model]
    shape = cb.LlamaShape(n_vocab=V, n_embd=E, n_layer=L, n_head=H, n_head_kv=KV, n_ff=F, n_ctx=2048, tied=tied)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"realizar-gpu-serve-{model}-{wtype}.gguf"
    cb.random_llama_gguf(path, shape, wtype, seed=1, share_layers=True, fast_random=True)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = staged_env()
    server = subprocess.Popen([sys.executable, "-m", "realizar.cli", "serve", "--device", "cuda", "--model",
                               f"m={path}", "--max-num-seqs", "64", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        t_end = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > t_end:
                raise RuntimeError("server did not become healthy: " + (server.stderr.read() if server.poll()
                                                                         is not None else "timeout")[-300:])
            time.sleep(0.5)

        def loadtest(*extra: str) -> dict:
            st, out = run([sys.executable, "-m", "realizar.cli", "loadtest", "--url", url, "--scenario",
                           "completions", "--json", *extra], 60, env=env)
            rep = next((json.loads(x) for x in out.splitlines() if x.startswith("{")), None)
            if rep is None:
                raise RuntimeError("loadtest: " + tail(out, 3))
            return rep

        loadtest("-n", "8", "-c", "8")  # warm-up: graphs for the batch sizes ahead are captured on first use
        runs = [loadtest() for _ in range(2 if quick else 3)]
        single = loadtest("-n", "4", "-c", "1")
        tps = sorted(r["tokens_per_s"] for r in runs)
        return {"serve48_tps": tps[len(tps) // 2], "serve48_runs": tps,
                "serve48_p50_ms": sorted(r["p50_ms"] for r in runs)[len(runs) // 2],
                "serve48_failures": sum(r["failures"] for r in runs), "serve1_tps": single["tokens_per_s"],
                "serve1_p50_ms": single["p50_ms"]}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        path.unlink(missing_ok=True)


def bench_torch(model: str, quick: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    V, E, L, H, KV, F, tied = MODELS[model]
    cfg = LlamaConfig(vocab_size=V, hidden_size=E, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=KV, max_position_embeddings=2048, tie_word_embeddings=tied,
                      rms_norm_eps=1e-5)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.float16).eval()
    r = {"torch": torch.__version__}
    gen = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def timed(fn):
        torch.cuda.synchronize()
        t = time.monotonic()
        fn()
        torch.cuda.synchronize()
        return time.monotonic() - t

    with torch.inference_mode():
        n_dec = 32 if quick else 64
        ids = torch.randint(0, V, (1, 32), device="cuda")
        # warm-ups with the very same arguments: the first calls of a shape compile and allocate
        m.generate(ids, max_new_tokens=n_dec, min_new_tokens=n_dec, **gen)
        t_pre = timed(lambda: m(ids))
        t = timed(lambda: m.generate(ids, max_new_tokens=n_dec, min_new_tokens=n_dec, **gen))
        r["decode_tps"] = n_dec / max(t - t_pre, 1e-9)
        B, n_agg = 64, (8 if quick else 16)
        ids = torch.randint(0, V, (B, 32), device="cuda")
        m.generate(ids, max_new_tokens=n_agg, min_new_tokens=n_agg, **gen)
        t_pre = timed(lambda: m(ids))
        t = timed(lambda: m.generate(ids, max_new_tokens=n_agg, min_new_tokens=n_agg, **gen))
        r["agg64_tps"] = B * n_agg / max(t - t_pre, 1e-9)
        ids = torch.randint(0, V, (1, 512), device="cuda")
        m(ids)
        r["prefill_tps"] = 512 / min(timed(lambda: m(ids)) for _ in range(3))
    return r


def profile_ours(model: str, wtype: str) -> dict:
    """Per-kernel device time of 16 eager decode steps and one 512-token prefill, through PyTorch's profiler
    (CUPTI sees every kernel in the process, ours included). Programmatic dependent launch is off here: with
    it a kernel starts early and its time would include waiting for its predecessor."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from realizar import cuda_backend as cb

    V, E, L, H, KV, F, tied = MODELS[model]
    shape = cb.LlamaShape(n_vocab=V, n_embd=E, n_layer=L, n_head=H, n_head_kv=KV, n_ff=F, n_ctx=2048, tied=tied)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"realizar-gpu-profile-{model}-{wtype}.gguf"
    cb.random_llama_gguf(path, shape, wtype, seed=1, share_layers=True, fast_random=True)
    m = cb.CudaModel.from_gguf(path, n_ctx=2048, pdl=False)
    torch.zeros(1, device="cuda")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, 32).tolist()
    cache, table = m._cache_for(32 + 20)
    first = m.prefill(cache, prompt, table)
    m.decode_greedy(cache, [first], [32], [table], 2, use_graph=False)
    report = []
    for what, fn in (("decode x16 (eager)", lambda: m.decode_greedy(cache, [first], [34], [table], 16, use_graph=False)),
                     ("prefill 512", lambda: m.logits(rng.integers(0, V, 512).tolist()))):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        rows = [(e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda x: -x[2])
        total = sum(r[2] for r in rows)
        report.append(f"{what}: {total / 1e3:.2f} ms of kernels, {sum(r[1] for r in rows)} launches")
        for k, n, t in rows[:10]:
            report.append(f"  {t / 1e3:8.3f} ms {n:6d}x {t / max(n, 1):8.1f} us  {k[:80]}")
    path.unlink(missing_ok=True)
    return {"report": report}


def child(argv: list[str]) -> None:
    kind, model, wtype, quick = argv[0], argv[1], argv[2], argv[3] == "1"
    try:
        if kind == "ours":
            res = bench_ours(model, wtype, quick)
        elif kind == "profile":
            res = profile_ours(model, wtype)
        elif kind == "serve":
            res = bench_serve(model, wtype, quick)
        else:
            res = bench_torch(model, quick)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported in the table
        import traceback
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print("RESULT " + json.dumps(res), flush=True)


def run_child(kind: str, model: str, wtype: str, quick: bool, timeout: float) -> dict:
    st, out = run([sys.executable, __file__, "--child", kind, model, wtype, "1" if quick else "0"], timeout,
                  env=staged_env())
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"ok": False, "error": ("timed out" if st == 124 else f"exit {st}") + ": " + tail(out, 6).replace("\n", " | ")}


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------

def fmt(v, spec="{:,.0f}") -> str:
    return "-" if v is None else spec.format(v)


def table(gpu: str, bw: float | None, rows: list[dict], torch_rows: dict, sections: list[tuple[str, str, str]]) -> str:
    lines = ["", "=" * 118, f"realizar CUDA backend check — {gpu}",
             f"measured device copy bandwidth: {fmt(bw, '{:,.0f}')} GB/s (read + write)", "-" * 118]
    for name, status, detail in sections:
        lines.append(f"{name:<12} {status:<6} {detail}")
    lines.append("-" * 118)
    hdr = (f"{'model':<15}{'type':<6}{'MB/tok':>8}{'decode':>9}{'eager':>8}{'% roof':>8}{'agg@64':>9}{'xdec':>6}"
           f"{'prefill':>9} | {'torch dec':>9}{'agg@64':>9}{'prefill':>9} | vs torch (dec/agg/pre)")
    lines += [hdr, "-" * 118]
    for r in rows:
        tr = torch_rows.get(r["model"], {})
        if not r.get("ok"):
            lines.append(f"{r['model']:<15}{r['type']:<6} FAILED: {r.get('error', '?')[:90]}")
            continue
        roof = None
        if bw and r.get("bytes_per_token"):
            roof = 100.0 * r["decode_tps"] / (bw * 1e9 / r["bytes_per_token"])
        ratio = r["agg64_tps"] / r["decode_tps"] if r.get("decode_tps") else None

        def vs(k, r=r, tr=tr):
            return f"{r[k] / tr[k]:.1f}x" if tr.get("ok") and tr.get(k) else "-"

        lines.append(f"{r['model']:<15}{r['type']:<6}{r['bytes_per_token'] / 1e6:>8.1f}{fmt(r['decode_tps']):>9}"
                     f"{fmt(r.get('decode_eager_tps')):>8}{fmt(roof, '{:.0f}%'):>8}{fmt(r['agg64_tps']):>9}"
                     f"{fmt(ratio, '{:.1f}'):>6}{fmt(r['prefill_tps']):>9} | "
                     f"{fmt(tr.get('decode_tps')):>9}{fmt(tr.get('agg64_tps')):>9}{fmt(tr.get('prefill_tps')):>9} | "
                     f"{vs('decode_tps')}/{vs('agg64_tps')}/{vs('prefill_tps')}")
    for model, tr in torch_rows.items():
        if not tr.get("ok"):
            lines.append(f"torch {model}: FAILED: {tr.get('error', '?')[:100]}")
    lines.append("targets (H100): 1.1B Q4_K decode >= 60% roof; 135M Q4_1 decode >= 2,000 tok/s; agg@64 >= 10x decode;"
                 " 1.1B prefill >= 20,000 tok/s; ahead of torch on every row")
    lines.append("=" * 118)
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (default 330)")
    ap.add_argument("--skip-build", action="store_true", help="use build/gpu/stage as it is")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--tests", default="", help="comma-separated test groups to run (default: all)")
    ap.add_argument("--skip-bench", action="store_true", help="no benchmarks and no profile")
    ap.add_argument("--quick", action="store_true", help="fewer decode steps")
    ap.add_argument("--no-torch", action="store_true", help="no PyTorch baseline (saves about a minute)")
    ap.add_argument("--no-serve", action="store_true", help="no server load test")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default $OUT)")
    args = ap.parse_args()

    present, gpu = gpu_present()
    log(f"python {sys.version.split()[0]} at {sys.executable}; GPU: {gpu}")
    if not present:
        print(f"gpu-check: SKIPPED — {gpu}. Nothing was built or measured; run this on a machine with an NVIDIA "
              "GPU (the CUDA module's CPU-side tests run with `make test`).", flush=True)
        return 1

    sections: list[tuple[str, str, str]] = []
    budget_end = args.budget

    def left(reserve: float = 0.0) -> float:
        return budget_end - elapsed() - reserve

    # 1. build
    if args.skip_build and (STAGE / "realizar").exists():
        sections.append(("build", "skip", f"using {STAGE}"))
    else:
        log("building _core and _cuda with CMake ...")
        ok, msg = build(cuda_archs(gpu), min(200.0, left(60)))
        sections.append(("build", "ok" if ok else "FAIL", msg.splitlines()[0]))
        log(msg)
        if not ok:
            print(table(gpu, None, [], {}, sections), flush=True)
            return 1

    # 2. device facts and bandwidth
    st, out = run([sys.executable, "-c", "import json; from realizar import _cuda; i = _cuda.device_info(); "
                   "i['copy_gbs'] = _cuda.measure_copy_bandwidth(1 << 30, 10); print('RESULT ' + json.dumps(i))"],
                  60, env=staged_env())
    info = next((json.loads(x[7:]) for x in out.splitlines() if x.startswith("RESULT ")), None)
    bw = info.get("copy_gbs") if info else None
    sections.append(("device", "ok" if info else "FAIL",
                     json.dumps({k: info[k] for k in ("name", "compute_capability", "sm_count", "total_mem",
                                                      "driver_version", "runtime_version")}) if info else tail(out, 3)))

    # 3. tests, one process per kernel family: a device fault poisons its CUDA context, not the other groups
    groups = [("host", "host or module or gguf_args"), ("quant-mv", "(quantizer or dequantize or matvec or device_info) and not host"),
              ("tensorcore", "tensor_core"), ("norm/rope", "rmsnorm or rope"), ("attention", "attention and not batched"),
              ("sampling", "sampling"), ("model", "logits or graph or batched or engine or leak or device_cuda")]
    if args.skip_tests:
        sections.append(("tests", "skip", ""))
    else:
        t_end = elapsed() + max(60.0, min(170.0, left(150)))
        wanted = {g.strip() for g in args.tests.split(",") if g.strip()}
        for name, expr in groups:
            if wanted and name not in wanted:
                continue
            limit = t_end - elapsed()
            if limit < 5:
                sections.append((f"test {name}", "skip", "time budget spent"))
                continue
            log(f"tests: {name} ...")
            st, out = run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "", "-k", expr, "-q",
                           "-p", "no:cacheprovider", "-o", "addopts=", "-rfE", "--tb=line"], limit, env=staged_env())
            summary = next((x for x in reversed(out.splitlines())
                            if " passed" in x or " failed" in x or " error" in x or "no tests ran" in x), tail(out, 1))
            sections.append((f"test {name}", "ok" if st in (0, 5) else "FAIL", summary.strip("= ")[:100]))
            failures = [x for x in out.splitlines() if x.startswith(("FAILED", "ERROR"))]
            for f in failures[:6]:
                sections.append(("", "", f[:110]))
            if st not in (0, 5):
                print(tail(out, 30), flush=True)

    # 4. benchmarks: ours per model and type, PyTorch per model
    rows: list[dict] = []
    torch_rows: dict[str, dict] = {}
    plan = [("ours", m, t) for m in MODELS for t in TYPES] + [("torch", m, "-") for m in MODELS if not args.no_torch]
    if args.skip_bench:
        plan = []
    for i, (kind, model, wtype) in enumerate(plan):
        remaining = len(plan) - i
        per = left(45 if args.no_serve else 120) / remaining  # kept for the server, the profile and the table
        if per < 8:
            res = {"ok": False, "error": "skipped: time budget spent"}
        else:
            log(f"bench {kind} {model} {wtype} (limit {min(per * 1.6, left(5)):.0f}s) ...")
            res = run_child(kind, model, wtype, args.quick, min(per * 1.6, left(5)))
            log(f"  -> {json.dumps(res)[:300]}")
        if kind == "ours":
            rows.append({"model": model, "type": wtype, **res})
        else:
            torch_rows[model] = res
    # 5. the server on the GPU under load (demo model's shape)
    serve = None
    if not args.skip_bench and not args.no_serve and left(5) > 50:
        log("serve smollm2-135m Q4_1 under the loadtest's completions scenario ...")
        serve = run_child("serve", "smollm2-135m", "Q4_1", args.quick, min(120.0, left(5)))
        log(f"  -> {json.dumps(serve)[:300]}")
        sections.append(("serve", "ok" if serve.get("ok") else "FAIL",
                         f"realizar serve --device cuda, smollm2-135m-shaped Q4_1: 48 clients x 32 tokens "
                         f"{fmt(serve.get('serve48_tps'))} tok/s (runs {serve.get('serve48_runs')}, p50 "
                         f"{fmt(serve.get('serve48_p50_ms'))} ms, {serve.get('serve48_failures')} failed); 1 client "
                         f"{fmt(serve.get('serve1_tps'))} tok/s" if serve.get("ok") else str(serve.get("error"))[:100]))
    # 6. where the time goes (informative; only with time to spare)
    if left(5) > 40 and not args.skip_bench:
        log("profiling tinyllama-1.1b Q4_K kernels ...")
        prof = run_child("profile", "tinyllama-1.1b", "Q4_K", args.quick, min(60.0, left(5)))
        print("\n".join(prof.get("report") or [f"profile: {prof.get('error')}"]), flush=True)
    report = table(gpu, bw, rows, torch_rows, sections)
    print(report, flush=True)
    if args.out:
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "gpu_check.json").write_text(json.dumps(
                {"gpu": gpu, "device": info, "sections": sections, "ours": rows, "torch": torch_rows, "serve": serve},
                indent=1))
            (Path(args.out) / "gpu_check_table.txt").write_text(report + "\n")
        except OSError as e:
            print(f"could not write results to {args.out}: {e}")
    ok = all(s[1] in ("ok", "skip", "") for s in sections) and all(r.get("ok") for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
