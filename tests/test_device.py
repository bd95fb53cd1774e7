"""Choosing the compute device: Model.load(device=...), `--device`, the engine's KV budget from the model.

These run everywhere; what needs a GPU (the same calls succeeding on one) is in test_cuda.py, marked `cuda`."""
from __future__ import annotations

import subprocess
import sys

import pytest

import realizar
from realizar import DeviceError, Model
from realizar.cuda_backend import LlamaShape, random_llama_gguf
from realizar.engine import Engine, EngineConfig, kv_pool_blocks
from realizar.server import ServerConfig

SHAPE = LlamaShape(n_vocab=512, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_ctx=256)
no_gpu = pytest.mark.skipif(realizar.cuda_available(), reason="a usable GPU is present")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("device") / "tiny.gguf"
    random_llama_gguf(path, SHAPE, "Q8_0", seed=3)
    return path


def test_random_model_carries_a_byte_tokenizer(tiny):
    m = Model.load(tiny, threads=1)
    assert m.device == "cpu" and m.kv_memory_budget() is None
    text = "héllo, wörld"
    ids = m.tokenize(text)
    assert ids == list(text.encode())            # one token per UTF-8 byte, no BOS
    assert m.detokenize(ids) == text
    assert m.tokenize("<|im_end|>", parse_special=True) == [258]
    out = m.generate("abc", max_tokens=5, ignore_eos=True)
    assert len(out.tokens) == 5 and all(0 <= t < SHAPE.n_vocab for t in out.tokens)


@pytest.mark.parametrize("device", ["tpu", "", 3, None])
def test_unknown_device_is_a_value_error(tiny, device):
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        Model.load(tiny, device=device)


def test_device_is_case_insensitive(tiny):
    assert Model.load(tiny, threads=1, device=" CPU ").device == "cpu"


@no_gpu
def test_cuda_without_a_gpu_is_a_device_error(tiny):
    with pytest.raises(DeviceError, match=r"tiny\.gguf: cannot run on device 'cuda'"):
        Model.load(tiny, device="cuda")


@no_gpu
@pytest.mark.parametrize("command", [["serve", "--device", "cuda"], ["generate", "--device", "cuda", "{path}", "hi"]])
def test_cli_device_cuda_without_a_gpu_exits_1(tiny, command):
    argv = [sys.executable, "-m", "realizar.cli", *(c.replace("{path}", str(tiny)) for c in command)]
    if command[0] == "serve":
        argv += ["--model", f"tiny={tiny}", "--port", "1"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "cuda" in p.stderr and ("no usable CUDA device" in p.stderr or "not built" in p.stderr), p.stderr
    assert "Traceback" not in p.stderr


def test_server_config_rejects_unknown_device():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        ServerConfig(device="gpu")


def test_kv_pool_follows_the_models_memory_budget():
    cfg = EngineConfig(max_num_seqs=4)
    per_token, ctx = 1000, 1024                     # 64 blocks of 16 per full context
    block = per_token * 16
    assert kv_pool_blocks(cfg, per_token, ctx, memory_budget=100 * block) == 100
    assert kv_pool_blocks(cfg, per_token, ctx, memory_budget=10**12) == 4 * 64   # max_num_seqs contexts at most
    assert kv_pool_blocks(cfg, per_token, ctx, memory_budget=block) == 64        # never under one context
    assert kv_pool_blocks(EngineConfig(kv_cache_bytes=7 * block), per_token, ctx, memory_budget=block) == 7


def test_engine_asks_the_model_for_its_budget(tiny):
    m = Model.load(tiny, threads=1)
    bytes_per_block = 16 * 2 * m.n_layer * m.n_kv_dim * 2
    m.kv_memory_budget = lambda: 20 * bytes_per_block   # what a GPU model reports from its free memory
    with Engine(m, EngineConfig(max_num_seqs=8)) as engine:
        assert engine.stats()["kv_blocks_total"] == 20
        out = engine.generate([1, 2, 3], max_tokens=4, ignore_eos=True)
    assert out.tokens == m.generate([1, 2, 3], max_tokens=4, ignore_eos=True).tokens
