"""The step contract the CPU core and the CUDA backend share (cpp/step.h): config keys and batch checks give the
same errors in both modules."""
from __future__ import annotations

import numpy as np
import pytest

import realizar
from realizar.cuda_backend import LlamaShape, core_args_from_gguf, random_llama_gguf

core = pytest.importorskip("realizar._core")


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    path = tmp_path_factory.mktemp("contract") / "m.gguf"
    random_llama_gguf(path, LlamaShape(n_vocab=300, n_embd=64, n_layer=1, n_head=2, n_head_kv=1, n_ff=128), "Q8_0")
    gf = realizar.GGUFFile(path)
    yield core_args_from_gguf(gf)
    gf.close()


def constructors():
    out = [("CoreModel", lambda c, g, ls: core.CoreModel(c, g, ls, 1))]
    try:
        from realizar import _cuda
    except ImportError:
        return out
    return out + [("CudaModel", lambda c, g, ls: _cuda.CudaModel(c, g, ls))]


@pytest.mark.parametrize("who,make", constructors())
def test_config_keys_are_checked_by_name(args, who, make):
    config, globals_, layers = args
    with pytest.raises(ValueError, match=f"{who} config: unknown key 'n_experts'"):
        make({**config, "n_experts": 8}, globals_, layers)
    without = {k: v for k, v in config.items() if k != "n_head_kv"}
    with pytest.raises(ValueError, match=f"{who} config: missing key 'n_head_kv'"):
        make(without, globals_, layers)


def test_batch_checks_name_the_problem(args):
    config, globals_, layers = args
    m = core.CoreModel(config, globals_, layers, 1)
    kv = core.KVCache(config["n_layer"], config["n_head_kv"] * config["head_dim"], 2, 16,
                       head_dim=config["head_dim"])

    def fwd(tokens, pos, table, rows=(0,)):
        return m.forward(kv, np.array(tokens, np.int32), np.array([len(tokens)], np.int32),
                         np.array([pos], np.int32), [np.array(table, np.int32)], np.array(rows, np.int32))

    assert fwd([1], 0, [0]).shape == (1, config["n_vocab"])
    with pytest.raises(ValueError, match=r"token id 300 out of range \[0, 300\)"):
        fwd([300], 0, [0])
    with pytest.raises(ValueError, match="block table of 1 blocks does not cover positions up to 17"):
        fwd([1], 16, [0])
    with pytest.raises(ValueError, match=r"block id 5 out of range \[0, 2\)"):
        fwd([1], 0, [5])
    with pytest.raises(ValueError, match=r"logit row 1 out of range \[0, 1\)"):
        fwd([1], 0, [0], rows=(1,))
    with pytest.raises(ValueError, match="negative position"):
        fwd([1], -1, [0])
