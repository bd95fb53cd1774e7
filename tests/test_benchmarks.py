"""The benchmark modules import without running anything, as asv's discovery imports them: none may parse the
command line, start a server or measure at import time (soak_server.py once did, which broke `asv run`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

IMPORT_ALL = """
import importlib, sys, time
sys.path.insert(0, sys.argv[1])
sys.argv = ["asv-discovery", "--not-an-option"]  # a module that parses arguments at import fails on this
for name in NAMES:
    t0 = time.monotonic()
    importlib.import_module(name)
    assert time.monotonic() - t0 < 20, name + " took too long to import"
print("imported", len(NAMES))
"""


def test_every_benchmark_module_imports_without_running():
    names = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem != "__init__")
    assert "soak_server" in names and "bench_kernels" in names
    code = f"NAMES = {names!r}\n" + IMPORT_ALL
    r = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"imported {len(names)}"
