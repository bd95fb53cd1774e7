"""`realizar generate` and `realizar chat` through the real command line (a subprocess), and their flags."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from realizar import cli
from realizar.cli_model import generation_config


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "REALIZAR_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "realizar.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=full_env)


def parse(*argv: str):
    return cli.build_parser().parse_args(["generate", "model.gguf", "hi", *argv])


def test_generate_streams_the_greedy_text(model_path, reference):
    case = reference["variants"]["Q4_1"]["prompts"][0]
    r = run("generate", str(model_path), case["prompt"], "--max-tokens", "12", "--stats")
    assert r.returncode == 0, r.stderr
    from realizar.model import Model

    m = Model.load(model_path, threads=2, n_ctx=64)
    try:
        expect = m.generate(case["prompt"], max_tokens=12).text
    finally:
        m.close()
    assert r.stdout == expect + "\n"
    assert "tok/s" in r.stderr


def test_generate_chat_flag_and_stop(model_path):
    r = run("generate", str(model_path), "What is 2+2?", "--chat", "-n", "24", "--stop", "4")
    assert r.returncode == 0, r.stderr
    assert "4" not in r.stdout


def test_chat_reads_lines_until_exit(model_path):
    r = run("chat", str(model_path), "-n", "16", stdin="What is 2+2?\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.strip()


def test_generate_kv_cache_dtype(model_path):
    prompt = "The capital of France is"
    r = run("generate", str(model_path), prompt, "-n", "10", "--ignore-eos", "--kv-cache-dtype", "q8_0")
    assert r.returncode == 0, r.stderr
    from realizar.model import Model

    m = Model.load(model_path, threads=2, n_ctx=64, kv_cache_dtype="q8_0")
    try:
        assert r.stdout == m.generate(prompt, max_tokens=10, ignore_eos=True).text + "\n"
    finally:
        m.close()
    r = run("generate", str(model_path), prompt, "-n", "2", env={"REALIZAR_KV_CACHE_DTYPE": "q4_0"})
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "kv_cache_dtype" in r.stderr
    assert parse().kv_cache_dtype == "f16" and parse("--kv-cache-dtype", "q8_0").kv_cache_dtype == "q8_0"


def test_errors_are_one_line(tmp_path, model_path):
    r = run("generate", str(tmp_path / "missing.gguf"), "hi")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really")
    r = run("generate", str(bad), "hi")
    assert r.returncode != 0 and r.stderr.startswith("realizar: error:") and "Traceback" not in r.stderr
    r = run("generate", str(model_path), "hi", "--temperature", "-2")
    assert r.returncode != 0 and "temperature" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", str(model_path), "hi " * 100, "--ctx-size", "16")
    assert r.returncode != 0 and "longer than the context" in r.stderr


def test_flags_make_the_config():
    assert generation_config(parse()).strategy == "greedy"
    assert generation_config(parse("--top-k", "5")).strategy == "top_k"
    assert generation_config(parse("--temperature", "0.7")).strategy == "top_p"
    c = generation_config(parse("--strategy", "top_k", "--top-k", "3", "--seed", "9", "--stop", "a", "--stop", "b\\n",
                                "-n", "7", "--repetition-penalty", "1.1", "--ignore-eos"))
    assert (c.strategy, c.top_k, c.seed, c.stop, c.max_tokens, c.repetition_penalty, c.ignore_eos) == \
        ("top_k", 3, 9, ["a", "b\n"], 7, 1.1, True)


def test_environment_twins(monkeypatch):
    monkeypatch.setenv("REALIZAR_MAX_TOKENS", "9")
    monkeypatch.setenv("REALIZAR_TEMPERATURE", "0.5")
    monkeypatch.setenv("REALIZAR_SEED", "4")
    monkeypatch.setenv("REALIZAR_THREADS", "3")
    monkeypatch.setenv("REALIZAR_STOP", "###")
    assert not parse().no_pack
    monkeypatch.setenv("REALIZAR_NO_PACK", "1")
    args = parse()
    c = generation_config(args)
    assert (c.max_tokens, c.temperature, c.seed, c.strategy, c.stop, args.threads) == (9, 0.5, 4, "top_p", ["###"], 3)
    assert args.no_pack
    assert generation_config(parse("--max-tokens", "2")).max_tokens == 2  # the flag wins


@pytest.mark.parametrize("flag", ["--max-tokens", "--top-p"])
def test_bad_flag_values(flag):
    with pytest.raises(ValueError, match=flag.lstrip("-").replace("-", "_")):
        generation_config(parse(flag, "0"))
