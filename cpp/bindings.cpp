// The one pybind11 file: arrays are checked while the GIL is held, the GIL is released only around compute,
// and results come back as numpy arrays that own their buffer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "matmul.h"
#include "packed.h"
#include "threadpool.h"
#include "bpe.h"
// model
#include <map>
#include "kv_cache.h"
#include "model.h"

namespace py = pybind11;
using namespace rz;

namespace {

// A numpy array that owns a heap buffer of `n` elements of T.
template <typename T>
py::array_t<T> owned_array(std::vector<py::ssize_t> shape, T** data) {
    py::ssize_t count = 1;
    for (auto s : shape) count *= s;
    auto* buf = new T[size_t(count > 0 ? count : 1)];
    py::capsule owner(buf, [](void* p) { delete[] static_cast<T*>(p); });
    *data = buf;
    return py::array_t<T>(shape, buf, owner);
}

Isa isa_arg(const std::optional<std::string>& isa) { return isa ? checked_isa(parse_isa(*isa)) : active_isa(); }

Type type_arg(int type_id) {
    if (!type_supported(Type(type_id))) throw py::value_error("unsupported tensor type id " + std::to_string(type_id));
    return Type(type_id);
}

size_t row_bytes(const TypeTraits& t, int64_t n) {
    if (n < 0 || n % t.block_size)
        throw py::value_error(std::string(t.name) + ": " + std::to_string(n) + " elements is not a multiple of the block size " +
                              std::to_string(t.block_size));
    return size_t(n / t.block_size) * t.type_size;
}

template <typename T>
const T* contiguous_data(const py::array& a, const char* what) {
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
    return static_cast<const T*>(a.data());
}

std::unique_ptr<ThreadPool>& pool_slot() {
    static std::unique_ptr<ThreadPool> pool;
    return pool;
}

ThreadPool& default_pool() {
    auto& p = pool_slot();
    if (!p) p = std::make_unique<ThreadPool>(default_thread_count());
    return *p;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "realizar's C++ core: GGUF block kernels, matmul, forward pass";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const std::invalid_argument& e) {
            PyErr_SetString(PyExc_ValueError, e.what());
        }
    });

    m.def("isa", [] { return std::string(isa_name(active_isa())); }, "The kernel level in use.");
    m.def("best_isa", [] { return std::string(isa_name(best_supported_isa())); });
    m.def("supported_isas", [] {
        std::vector<std::string> out;
        for (int i = 0; i <= int(best_supported_isa()); ++i) out.emplace_back(isa_name(Isa(i)));
        return out;
    });
    m.def("set_isa", [](const std::string& name) { set_active_isa(parse_isa(name)); }, py::arg("name"));

    m.def("threads", [] { return default_pool().size(); }, "Threads of the default pool.");
    m.def("set_threads", [](int n) {
        if (n < 1 || n > 1024) throw py::value_error("threads must be in [1, 1024], got " + std::to_string(n));
        pool_slot() = std::make_unique<ThreadPool>(n);
    }, py::arg("n"));

    m.def("type_info", [](int type_id) {
        const TypeTraits& t = traits(type_arg(type_id), Isa::Scalar);
        py::dict d;
        d["name"] = t.name;
        d["block_size"] = t.block_size;
        d["type_size"] = t.type_size;
        d["is_quantized"] = t.is_quantized;
        d["vec_dot_type"] = int(t.vec_dot_type);
        d["can_quantize"] = t.quantize != nullptr;
        d["can_dot"] = t.vec_dot != nullptr;
        return d;
    }, py::arg("type_id"));

    m.def("dequantize", [](py::array_t<uint8_t, py::array::c_style> data, int type_id, int64_t n,
                           std::optional<std::string> isa) {
        const TypeTraits& t = traits(type_arg(type_id), isa_arg(isa));
        const size_t need = row_bytes(t, n);
        if (size_t(data.size()) != need)
            throw py::value_error(std::string(t.name) + ": " + std::to_string(n) + " elements need " + std::to_string(need) +
                                  " bytes, got " + std::to_string(data.size()));
        float* out;
        auto result = owned_array<float>({py::ssize_t(n)}, &out);
        const uint8_t* src = data.data();
        {
            py::gil_scoped_release release;
            t.dequantize(src, out, n);
        }
        return result;
    }, py::arg("data"), py::arg("type_id"), py::arg("n"), py::arg("isa") = py::none(),
    "Raw block bytes -> float32[n].");

    m.def("quantize", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, int type_id,
                         std::optional<std::string> isa) {
        const TypeTraits& t = traits(type_arg(type_id), isa_arg(isa));
        if (!t.quantize) throw py::value_error(std::string("no quantizer for type ") + t.name);
        const int64_t n = x.size();
        const size_t nbytes = row_bytes(t, n);
        uint8_t* out;
        auto result = owned_array<uint8_t>({py::ssize_t(nbytes)}, &out);
        const float* src = x.data();
        {
            py::gil_scoped_release release;
            // Row by row of at most 1 Mi elements keeps each call's working set modest.
            t.quantize(src, out, n);
        }
        return result;
    }, py::arg("x"), py::arg("type_id"), py::arg("isa") = py::none(), "float32 values -> raw block bytes.");

    m.def("vec_dot", [](int type_id, py::array_t<uint8_t, py::array::c_style> x, py::array_t<uint8_t, py::array::c_style> y,
                        int64_t n, std::optional<std::string> isa) {
        const TypeTraits& t = traits(type_arg(type_id), isa_arg(isa));
        if (!t.vec_dot) throw py::value_error(std::string("no dot product for type ") + t.name);
        const TypeTraits& at = traits(t.vec_dot_type, isa_arg(isa));
        if (size_t(x.size()) != row_bytes(t, n)) throw py::value_error("x: wrong byte size for n elements");
        if (size_t(y.size()) != row_bytes(at, n)) throw py::value_error("y: wrong byte size for n elements");
        float s = 0.f;
        {
            py::gil_scoped_release release;
            t.vec_dot(n, &s, x.data(), y.data());
        }
        return s;
    }, py::arg("type_id"), py::arg("x"), py::arg("y"), py::arg("n"), py::arg("isa") = py::none(),
    "Dot product of a weight row (type_id blocks) with an activation row in its vec_dot_type.");

    m.def("argmax", [](py::array_t<float, py::array::c_style | py::array::forcecast> x, std::optional<std::string> isa) {
        if (x.ndim() != 1) throw py::value_error("x must be 1-D");
        if (x.size() == 0) throw py::value_error("x: argmax of an empty array");
        return rz::argmax(x.data(), x.size(), isa_arg(isa)).index;
    }, py::arg("x"), py::arg("isa") = py::none(),
    "The first index of x's largest value, a NaN counting as the largest (numpy.argmax's rule); the kernel the "
    "forward step's argmax=True uses.");

    m.def("matmul", [](int type_id, py::array_t<uint8_t, py::array::c_style> w, int64_t rows, int64_t k,
                       py::array_t<float, py::array::c_style | py::array::forcecast> x, std::optional<std::string> isa,
                       bool packed) {
        const Isa level = isa_arg(isa);
        const Type wtype = type_arg(type_id);
        const TypeTraits& t = traits(wtype, level);
        if (!t.vec_dot) throw py::value_error(std::string("no dot product for type ") + t.name);
        if (rows < 1) throw py::value_error("rows must be >= 1");
        if (packed && !packable(wtype, rows, k)) throw py::value_error("no packed layout for this matrix here");
        if (packed && level == Isa::Scalar) throw py::value_error("isa: packed products need avx2 or avx512");
        const size_t need = packed ? packed_bytes(wtype, rows, k) : row_bytes(t, k) * size_t(rows);
        if (size_t(w.size()) != need)
            throw py::value_error(std::string("w: expected ") + (packed ? "the packed copy's " : "rows * row bytes = ") +
                                  std::to_string(need) + " bytes, got " + std::to_string(w.size()));
        if (x.ndim() != 2 || x.shape(1) != k) throw py::value_error("x must have shape (n, k)");
        const int64_t n = x.shape(0);
        float* out;
        auto result = owned_array<float>({py::ssize_t(n), py::ssize_t(rows)}, &out);
        const uint8_t* wp = w.data();
        const float* xp = x.data();
        {
            py::gil_scoped_release release;
            std::vector<uint8_t> scratch;
            if (packed) {
                matmul_packed(default_pool(), wtype, wp, rows, k, xp, n, out, rows, scratch, level);
            } else {
                matmul(default_pool(), wtype, wp, rows, k, xp, n, out, rows, scratch, level);
            }
        }
        return result;
    }, py::arg("type_id"), py::arg("w"), py::arg("rows"), py::arg("k"), py::arg("x"), py::arg("isa") = py::none(),
    py::arg("packed") = false,
    "y[n, rows] = x[n, k] @ W[rows, k].T with W in GGUF blocks, multithreaded on the default pool. packed: W holds\n"
    "pack_weights' layout (as the model's SIMD products use).");
    m.def("pack_weights", [](int type_id, py::array_t<uint8_t, py::array::c_style> w, int64_t rows, int64_t k) {
        const Type wtype = type_arg(type_id);
        const TypeTraits& t = traits(wtype, Isa::Scalar);
        if (rows < 1 || size_t(w.size()) != row_bytes(t, k) * size_t(rows))
            throw py::value_error("w: expected rows * row bytes = " + std::to_string(row_bytes(t, k) * size_t(std::max<int64_t>(rows, 0))) +
                                  " bytes, got " + std::to_string(w.size()));
        const std::vector<uint8_t> p = pack_weights(wtype, w.data(), rows, k);
        uint8_t* out;
        auto result = owned_array<uint8_t>({py::ssize_t(p.size())}, &out);
        std::copy(p.begin(), p.end(), out);
        return result;
    }, py::arg("type_id"), py::arg("w"), py::arg("rows"), py::arg("k"),
    "The interleaved copy of a GGUF matrix the model's SIMD products read (ValueError where there is none).");
    m.def("packable", [](int type_id, int64_t rows, int64_t k) { return packable(type_arg(type_id), rows, k); },
          py::arg("type_id"), py::arg("rows"), py::arg("k"),
          "Whether a rows x k matrix of this type gets a packed copy (and packed kernels) on this CPU.");

    // ---- tokenizer ----
    // Byte-level BPE (gpt2 family): pre-tokenizer and merge loop in C++ for the >= 5 MB/s target.
    py::class_<BpeEncoder>(m, "BpeEncoder")
        .def(py::init([](const std::vector<std::string>& tokens, const std::vector<std::string>& merges,
                         const std::string& pre, bool ignore_merges) {
                 return std::make_unique<BpeEncoder>(tokens, merges, parse_pre_tokenizer(pre), ignore_merges);
             }), py::arg("tokens"), py::arg("merges"), py::arg("pre"), py::arg("ignore_merges"))
        .def("encode", [](const BpeEncoder& self, const std::string& text) {
                 std::vector<int32_t> ids;
                 {
                     py::gil_scoped_release release;
                     ids = self.encode(text);
                 }
                 return ids;
             }, py::arg("text"))
        .def_property_readonly("vocab_size", &BpeEncoder::vocab_size);
    m.def("bpe_pre_tokenize", [](const std::string& text, const std::string& pre) {
        return pre_tokenize(text, parse_pre_tokenizer(pre));
    }, py::arg("text"), py::arg("pre"));

    // ---- model ----
    // KVCache and CoreModel: the batched forward step of realizar.model. Arguments are checked with the GIL
    // held; the whole step runs with it released; logits come back as a numpy array owning its buffer.
    py::class_<KVCache>(m, "KVCache", "Paged KV cache: n_blocks blocks of block_size positions per layer, K and V\n"
                                      "as f16 or q8_0 (dtype).")
        .def(py::init([](int n_layer, int n_kv_dim, int n_blocks, int block_size, const std::string& dtype,
                         int head_dim) {
                 if (dtype != "f16" && dtype != "q8_0")
                     throw py::value_error("KVCache: dtype must be 'f16' or 'q8_0', got '" + dtype + "'");
                 return new KVCache(n_layer, n_kv_dim, n_blocks, block_size, dtype == "f16" ? Type::F16 : Type::Q8_0,
                                    head_dim);
             }),
             py::arg("n_layer"), py::arg("n_kv_dim"), py::arg("n_blocks"), py::arg("block_size") = 16,
             py::arg("dtype") = "f16", py::arg("head_dim") = 0,
             "head_dim: the model's (the cache is laid out head by head); 0: n_kv_dim, one head.")
        .def_property_readonly("dtype", [](const KVCache& c) { return c.type() == Type::F16 ? "f16" : "q8_0"; })
        .def_property_readonly("head_dim", &KVCache::head_dim)
        .def_property_readonly("row_bytes", [](const KVCache& c) { return c.head_row_bytes() * size_t(c.n_heads()); },
                               "Bytes of one position's K (or V) in one layer.")
        .def_property_readonly("n_layer", &KVCache::n_layer)
        .def_property_readonly("n_kv_dim", &KVCache::n_kv_dim)
        .def_property_readonly("n_blocks", &KVCache::n_blocks)
        .def_property_readonly("block_size", &KVCache::block_size)
        .def_property_readonly("nbytes", &KVCache::nbytes)
        .def("copy_block", [](KVCache& c, int src, int dst) {
            py::gil_scoped_release release;
            c.copy_block(src, dst);
        }, py::arg("src"), py::arg("dst"), "Copy every layer's K and V of block src into block dst.");

    struct CoreModelHandle {
        std::unique_ptr<CoreModel> model;
        py::list keep_alive;  // the arrays whose buffers the weights point into
    };
    py::class_<CoreModelHandle>(m, "CoreModel", "A llama-family model over weights in GGUF blocks (used in place).")
        .def(py::init([](py::dict config, py::dict globals, py::list layers, int threads, bool pack) {
            std::map<std::string, double> values;
            for (auto item : config) values[py::str(item.first)] = item.second.cast<double>();
            const ModelConfig c = model_config_from(values, "CoreModel");
            if (threads < 1 || threads > 1024)
                throw py::value_error("threads must be in [1, 1024], got " + std::to_string(threads));

            auto handle = std::make_unique<CoreModelHandle>();
            // name -> (type_id, shape, uint8 array)
            auto tensor_map = [&](py::dict d) {
                std::map<std::string, TensorArg> out;
                for (auto item : d) {
                    const std::string name = py::str(item.first);
                    auto tup = item.second.cast<py::tuple>();
                    if (tup.size() != 3) throw py::value_error(name + ": expected (type_id, shape, data)");
                    TensorArg t;
                    t.type = Type(tup[0].cast<int>());
                    t.shape = tup[1].cast<std::vector<int64_t>>();
                    auto arr = py::array::ensure(tup[2]);
                    if (!arr || arr.itemsize() != 1 || !(arr.flags() & py::array::c_style))
                        throw py::value_error(name + ": data must be a C-contiguous uint8 array");
                    t.data = arr.data();
                    t.nbytes = size_t(arr.nbytes());
                    handle->keep_alive.append(arr);
                    out[name] = t;
                }
                return out;
            };
            auto g = tensor_map(globals);
            std::vector<std::map<std::string, TensorArg>> ls;
            for (auto layer : layers) ls.push_back(tensor_map(layer.cast<py::dict>()));
            handle->model = std::make_unique<CoreModel>(c, g, ls, threads, pack);
            return handle;
        }), py::arg("config"), py::arg("globals"), py::arg("layers"), py::arg("threads"), py::arg("pack") = true)
        .def_property_readonly("packed_bytes", [](const CoreModelHandle& h) { return h.model->packed_bytes(); },
                               "Bytes of the packed weight copies (0 when loaded with pack=False)")
        .def_property_readonly("threads", [](const CoreModelHandle& h) { return h.model->n_threads(); })
        .def_property_readonly("n_vocab", [](const CoreModelHandle& h) { return h.model->config().n_vocab; })
        .def("forward", [](CoreModelHandle& h, KVCache& cache,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> seq_lens,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> pos0, py::list block_tables,
                           py::array_t<int32_t, py::array::c_style | py::array::forcecast> logit_rows, bool argmax) -> py::object {
            if (tokens.ndim() != 1 || seq_lens.ndim() != 1 || pos0.ndim() != 1 || logit_rows.ndim() != 1)
                throw py::value_error("forward: tokens, seq_lens, pos0 and logit_rows must be 1-D");
            const py::ssize_t n_seqs = seq_lens.size();
            if (pos0.size() != n_seqs || py::ssize_t(block_tables.size()) != n_seqs)
                throw py::value_error("forward: seq_lens, pos0 and block_tables must have one entry per sequence");
            if (tokens.size() > (1 << 24) || logit_rows.size() > (1 << 24) || n_seqs > (1 << 20))
                throw py::value_error("forward: batch too large");
            std::vector<py::array_t<int32_t, py::array::c_style | py::array::forcecast>> tables;
            auto spans = std::vector<SeqSpan>(size_t(n_seqs));
            for (py::ssize_t s = 0; s < n_seqs; ++s) {
                auto bt = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(block_tables[size_t(s)]);
                if (!bt || bt.ndim() != 1) throw py::value_error("forward: block_tables[" + std::to_string(s) + "] must be a 1-D int array");
                spans[size_t(s)] = {seq_lens.at(s), pos0.at(s), bt.data(), int32_t(bt.size())};
                tables.push_back(std::move(bt));
            }
            Batch b{tokens.data(), int32_t(tokens.size()), spans.data(), int32_t(n_seqs), logit_rows.data(),
                    int32_t(logit_rows.size())};
            float* out;
            auto result = owned_array<float>({py::ssize_t(b.n_logits), py::ssize_t(h.model->config().n_vocab)}, &out);
            int32_t* ids = nullptr;
            py::array_t<int32_t> id_array;
            if (argmax) id_array = owned_array<int32_t>({py::ssize_t(b.n_logits)}, &ids);
            {
                py::gil_scoped_release release;
                h.model->forward(cache, b, out, ids);
            }
            if (argmax) return py::make_tuple(result, id_array);
            return result;
        }, py::arg("cache"), py::arg("tokens"), py::arg("seq_lens"), py::arg("pos0"), py::arg("block_tables"),
        py::arg("logit_rows"), py::arg("argmax") = false,
        "One step: each sequence's new tokens (concatenated), their count and first position and block tables; "
        "returns float32 logits [len(logit_rows), n_vocab] for the given rows of tokens. argmax=True: returns "
        "(logits, int32 [len(logit_rows)]), each row's first index of its largest logit (a NaN counting as the "
        "largest, as numpy.argmax), found by the step's threads while the rows are in their caches.");
}
