"""Tokenizer throughput on English text (issue target: >= 5 MB/s, one thread).

    python benchmarks/bench_tokenizer.py [MODEL.gguf]      # prints MB/s, cold and warm piece cache
    asv run --bench bench_tokenizer                        # track_ functions below

The text is fixed: docstrings of the Python standard library in sorted file order. Rates are in this process's
CPU time, so other work on a shared machine does not count.
"""
from __future__ import annotations

import ast
import os
import sys
import sysconfig
import time


def english_corpus(nbytes: int) -> str:
    """Fixed English prose: the docstrings of the Python standard library, in sorted file order."""
    root = sysconfig.get_paths()["stdlib"]
    parts: list[str] = []
    total = 0
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        if "test" in folder.split(os.sep) or "site-packages" in folder:
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        parts.append(doc)
                        total += len(doc) + 2
                        if total >= nbytes:
                            return "\n\n".join(parts)[:nbytes]
    return "\n\n".join(parts)


def _tokenizer(path: str | None = None):
    from realizar import hub
    from realizar.gguf import GGUFFile
    from realizar.tokenizer import Tokenizer

    with GGUFFile(path or hub.resolve(hub.DEMO_MODEL, pull_missing=True)) as gf:
        return Tokenizer.from_metadata(gf.metadata)


def encode_rate(tok, text: str, cold: bool) -> float:
    """MB/s of CPU time for one encode of `text`."""
    if cold:
        tok._encoder.cache.clear()
    start = time.process_time()
    tok.encode(text)
    return len(text.encode()) / (time.process_time() - start) / 1e6


class TokenizerSuite:
    timeout = 300

    def setup_cache(self):
        return english_corpus(1_000_000)

    def setup(self, text):
        self.tok = _tokenizer()

    def track_encode_cold_mb_per_s(self, text):
        return encode_rate(self.tok, text, cold=True)

    def track_encode_warm_mb_per_s(self, text):
        self.tok.encode(text)
        return encode_rate(self.tok, text, cold=False)

    track_encode_cold_mb_per_s.unit = "MB/s"
    track_encode_warm_mb_per_s.unit = "MB/s"


def main() -> None:
    tok = _tokenizer(sys.argv[1] if len(sys.argv) > 1 else None)
    text = english_corpus(1_000_000)
    native = tok._encoder.native is not None
    cold = encode_rate(tok, text, cold=True)
    warm = sorted(encode_rate(tok, text, cold=False) for _ in range(5))[2]
    print(f"{'C++' if native else 'Python'} BPE encoder, {len(text.encode()) / 1e6:.2f} MB English: "
          f"cold cache {cold:.1f} MB/s, warm cache {warm:.1f} MB/s (median of 5, CPU time)")


if __name__ == "__main__":
    main()
