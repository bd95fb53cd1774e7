"""Runtime ISA selection: cpuid picks the level, REALIZAR_ISA forces one, realizar.isa() reports it."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

core = pytest.importorskip("realizar._core")

import realizar  # noqa: E402


def _isa_in_subprocess(env_value: str) -> subprocess.CompletedProcess:
    code = "import realizar; print(realizar.isa())"
    env = {"REALIZAR_ISA": env_value, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_isa_reports_the_best_level_by_default():
    assert realizar.isa() in ("scalar", "avx2", "avx512")
    assert core.supported_isas()[0] == "scalar"
    assert core.best_isa() == core.supported_isas()[-1]


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_realizar_isa_forces_a_level(level):
    if level not in core.supported_isas():
        result = _isa_in_subprocess(level)
        assert result.returncode != 0
        assert "REALIZAR_ISA" in result.stderr and "not supported by this CPU" in result.stderr
    else:
        result = _isa_in_subprocess(level)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == level


def test_unknown_isa_name_is_a_clear_error():
    result = _isa_in_subprocess("sse9")
    assert result.returncode != 0
    assert "REALIZAR_ISA=sse9" in result.stderr and "unknown ISA level" in result.stderr


def test_kernels_accept_an_explicit_isa_and_reject_unknown_ones():
    with pytest.raises(ValueError, match="unknown ISA level"):
        core.dequantize(np.zeros(4, np.uint8), 0, 1, "neon")


def test_cuda_available_never_raises():
    assert realizar.cuda_available() in (True, False)
