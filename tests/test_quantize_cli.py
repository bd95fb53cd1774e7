"""`realizar quantize` and `realizar info` on the real model, through the CLI entry point."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("realizar._core")

from realizar import GGUFFile, dequantize  # noqa: E402
from realizar.cli import main  # noqa: E402
from realizar.requantize import choose_type  # noqa: E402
from realizar.types import GGMLType  # noqa: E402


def _relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


@pytest.mark.parametrize("target,bound", [("q8_0", 0.02), ("q4_K_M", 0.15), ("bf16", 0.01)])
def test_quantize_keeps_metadata_and_weights(tmp_path, model_path, target, bound):
    out = tmp_path / f"model.{target}.gguf"
    assert main(["quantize", str(model_path), str(out), "--type", target, "--quiet"]) == 0
    src, dst = GGUFFile(model_path), GGUFFile(out)
    try:
        assert set(dst.tensors) == set(src.tensors)
        for key, value in src.metadata.items():
            if key != "general.file_type":
                assert dst.types[key] == src.types[key], key
                if isinstance(value, np.ndarray):
                    np.testing.assert_array_equal(dst.metadata[key], value)
                else:
                    assert dst.metadata[key] == value, key
        assert dst.metadata["general.file_type"] != src.metadata["general.file_type"]
        for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "output_norm.weight"]:
            s, d = src.tensors[name], dst.tensors[name]
            assert d.shape == s.shape
            before = dequantize(s.data, s.type, s.shape)
            after = dequantize(d.data, d.type, d.shape)
            assert _relative_rms(after, before) < bound, (name, d.type)
    finally:
        src.close()
        dst.close()


def test_q4_K_M_policy():
    n = 30
    # Rows of 576 are not a multiple of 256: K-quants fall back to 32-block types.
    assert choose_type("blk.3.attn_q.weight", (576, 576), "q4_k_m", GGMLType.Q4_K, n, True) == GGMLType.Q5_0
    assert choose_type("blk.0.attn_v.weight", (192, 576), "q4_k_m", GGMLType.Q4_K, n, True) == GGMLType.Q8_0
    assert choose_type("blk.0.ffn_down.weight", (576, 1536), "q4_k_m", GGMLType.Q4_K, n, True) == GGMLType.Q6_K
    assert choose_type("blk.4.ffn_down.weight", (576, 1536), "q4_k_m", GGMLType.Q4_K, n, True) == GGMLType.Q4_K
    assert choose_type("token_embd.weight", (49152, 576), "q4_k_m", GGMLType.Q4_K, n, True) == GGMLType.Q8_0
    assert choose_type("token_embd.weight", (49152, 512), "q4_k_m", GGMLType.Q4_K, n, True) == GGMLType.Q6_K
    assert choose_type("blk.0.attn_norm.weight", (576,), "q4_k_m", GGMLType.Q4_K, n, True) == GGMLType.F32


def test_quantize_rejects_bad_type_and_same_output(tmp_path, model_path, capsys):
    assert main(["quantize", str(model_path), str(tmp_path / "x.gguf"), "--type", "q3_z"]) == 1
    assert "q3_z" in capsys.readouterr().err
    assert main(["quantize", str(model_path), str(model_path), "--type", "q8_0"]) == 1
    assert "overwrite" in capsys.readouterr().err


def test_info_text_and_json(model_path, capsys):
    assert main(["info", str(model_path)]) == 0
    text = capsys.readouterr().out
    assert "llama" in text and "Q4_1" in text
    assert main(["info", str(model_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["architecture"] == "llama"


def test_info_on_a_non_gguf_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("realizar: error: ") and str(bad) in err and err.count("\n") == 1
