// realizar._cuda: the CUDA backend's Python bindings. Compiled by the host compiler against cuda/api.h only.
// Arrays are checked while the GIL is held; the GIL is released around every device call; results come back
// as numpy arrays owning their buffers. Importing needs no driver and no GPU (static cudart): device_count()
// is then 0 and everything else raises RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>
#include <vector>

#include "api.h"

namespace py = pybind11;
using namespace rz;
using namespace rz::cu;

namespace {

template <typename T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <typename T>
py::array_t<T> owned_array(std::vector<py::ssize_t> shape, T** data) {
    py::ssize_t n = 1;
    for (auto s : shape) n *= s;
    T* buf = new T[size_t(n > 0 ? n : 1)];
    py::capsule owner(buf, [](void* p) { delete[] static_cast<T*>(p); });
    *data = buf;
    return py::array_t<T>(shape, buf, owner);
}

Type type_of(int id) {
    if (id < 0 || id >= kNumTypeIds) throw py::value_error("unknown type id " + std::to_string(id));
    return Type(id);
}

const uint8_t* bytes_of(const py::array& a, const char* what) {
    if (a.itemsize() != 1 || !(a.flags() & py::array::c_style))
        throw py::value_error(std::string(what) + " must be a C-contiguous uint8 array");
    return static_cast<const uint8_t*>(a.data());
}

RopeParams rope_from(const py::dict& d, int head_dim) {
    RopeParams r;
    r.n_rot = d.contains("n_rot") ? d["n_rot"].cast<int>() : head_dim;
    r.neox = d.contains("neox") && d["neox"].cast<bool>();
    if (d.contains("freq_base")) r.freq_base = d["freq_base"].cast<float>();
    if (d.contains("freq_scale")) r.freq_scale = d["freq_scale"].cast<float>();
    if (d.contains("ext_factor")) r.ext_factor = d["ext_factor"].cast<float>();
    if (d.contains("attn_factor")) r.attn_factor = d["attn_factor"].cast<float>();
    if (d.contains("beta_fast")) r.beta_fast = d["beta_fast"].cast<float>();
    if (d.contains("beta_slow")) r.beta_slow = d["beta_slow"].cast<float>();
    if (d.contains("n_ctx_orig")) r.n_ctx_orig = d["n_ctx_orig"].cast<int>();
    if (r.n_rot < 0 || r.n_rot > head_dim || r.n_rot % 2) throw py::value_error("rope n_rot must be even and <= head_dim");
    return r;
}

// The CPU core's CoreModel config keys, with the same defaults (cpp/step.h).
ModelConfig config_from(const py::dict& config) {
    std::map<std::string, double> values;
    for (auto item : config) values[py::str(item.first)] = item.second.cast<double>();
    return model_config_from(values, "CudaModel");
}

// name -> (type_id, shape, uint8 array), as the CPU core takes them
std::map<std::string, HostTensor> tensors_from(const py::dict& d, py::list& keep) {
    std::map<std::string, HostTensor> out;
    for (auto item : d) {
        const std::string name = py::str(item.first);
        auto tup = item.second.cast<py::tuple>();
        if (tup.size() != 3) throw py::value_error(name + ": expected (type_id, shape, data)");
        HostTensor t;
        t.type = type_of(tup[0].cast<int>());
        t.shape = tup[1].cast<std::vector<int64_t>>();
        auto arr = py::array::ensure(tup[2]);
        if (!arr) throw py::value_error(name + ": data must be an array");
        t.data = bytes_of(arr, name.c_str());
        t.nbytes = size_t(arr.nbytes());
        keep.append(arr);
        out[name] = t;
    }
    return out;
}

// Batch arguments shared by forward and forward_sample; the arrays stay alive in `keep`.
struct BatchArgs {
    std::vector<Arr<int32_t>> tables;
    std::vector<StepSeq> seqs;
    StepBatch b{};
};
void batch_from(BatchArgs& a, const Arr<int32_t>& tokens, const Arr<int32_t>& seq_lens, const Arr<int32_t>& pos0,
                const py::list& block_tables, const Arr<int32_t>& logit_rows) {
    if (tokens.ndim() != 1 || seq_lens.ndim() != 1 || pos0.ndim() != 1 || logit_rows.ndim() != 1)
        throw py::value_error("forward: tokens, seq_lens, pos0 and logit_rows must be 1-D");
    const py::ssize_t n_seqs = seq_lens.size();
    if (pos0.size() != n_seqs || py::ssize_t(block_tables.size()) != n_seqs)
        throw py::value_error("forward: seq_lens, pos0 and block_tables must have one entry per sequence");
    if (tokens.size() > (1 << 24) || logit_rows.size() > (1 << 24) || n_seqs > (1 << 20))
        throw py::value_error("forward: batch too large");
    a.seqs.resize(size_t(n_seqs));
    for (py::ssize_t s = 0; s < n_seqs; ++s) {
        auto bt = Arr<int32_t>::ensure(block_tables[size_t(s)]);
        if (!bt || bt.ndim() != 1)
            throw py::value_error("forward: block_tables[" + std::to_string(s) + "] must be a 1-D int array");
        a.seqs[size_t(s)] = {seq_lens.at(s), pos0.at(s), bt.data(), int32_t(bt.size())};
        a.tables.push_back(std::move(bt));
    }
    a.b = StepBatch{tokens.data(), int32_t(tokens.size()), a.seqs.data(), int32_t(n_seqs), logit_rows.data(),
                    int32_t(logit_rows.size())};
}

std::vector<SampleParams> params_from(py::ssize_t n, const Arr<float>& temperature, const Arr<int32_t>& top_k,
                                      const Arr<float>& top_p, const Arr<float>& min_p, const Arr<float>& u) {
    for (const py::array* a : {static_cast<const py::array*>(&temperature), static_cast<const py::array*>(&top_k),
                               static_cast<const py::array*>(&top_p), static_cast<const py::array*>(&min_p),
                               static_cast<const py::array*>(&u)})
        if (a->ndim() != 1 || a->size() != n) throw py::value_error("sampling parameters: one value per row");
    auto p = std::vector<SampleParams>(size_t(n));
    for (py::ssize_t i = 0; i < n; ++i) {
        p[size_t(i)].temperature = temperature.at(i);
        p[size_t(i)].top_k = top_k.at(i);
        p[size_t(i)].top_p = top_p.at(i);
        p[size_t(i)].min_p = min_p.at(i);
        p[size_t(i)].u = u.at(i);
        if (!(p[size_t(i)].u >= 0.f && p[size_t(i)].u < 1.f)) throw py::value_error("sampling: u must be in [0, 1)");
    }
    return p;
}

struct ModelHandle {
    std::unique_ptr<CudaModel> model;
};

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "realizar's CUDA backend: GGUF block kernels and the llama forward step on NVIDIA GPUs";
    py::register_exception<CudaError>(m, "CudaError", PyExc_RuntimeError);

    m.def("device_count", &device_count, "Usable CUDA devices; 0 without a driver or GPU (never raises).");
    m.def("device_info", [] {
        DeviceInfo i;
        {
            py::gil_scoped_release release;
            i = device_info();
        }
        py::dict d;
        d["name"] = i.name;
        d["compute_capability"] = py::make_tuple(i.cc_major, i.cc_minor);
        d["sm_count"] = i.sm_count;
        d["total_mem"] = i.total_mem;
        d["free_mem"] = i.free_mem;
        d["l2_bytes"] = i.l2_bytes;
        d["driver_version"] = i.driver_version;
        d["runtime_version"] = i.runtime_version;
        return d;
    });
    m.def("device_used_bytes", [] {
        py::gil_scoped_release release;
        return device_used_bytes();
    });
    m.def("measure_copy_bandwidth", [](size_t bytes, int reps) {
        py::gil_scoped_release release;
        return measure_copy_bandwidth(bytes, reps);
    }, py::arg("bytes") = size_t(1) << 30, py::arg("reps") = 10,
    "Device-to-device copy bandwidth in GB/s (bytes read + written), the median of reps copies.");
    m.def("type_supported", [](int type_id) { return cuda_type_supported(type_of(type_id)); }, py::arg("type_id"));
    m.attr("MATVEC_MAX_ROWS") = kMatvecMaxRows;
    m.attr("MAX_SAMPLE_CANDIDATES") = kMaxSampleCandidates;

    // ---- kernels over numpy arrays (tests) ----
    m.def("matmul", [](int type_id, py::array w, int rows, int k, Arr<float> x, int path, int split_sms,
                       bool split_invariant) {
        if (x.ndim() != 2 || x.shape(1) != k) throw py::value_error("matmul: x must be [n, k]");
        const uint8_t* wp = bytes_of(w, "w");
        const int n = int(x.shape(0));
        float* out;
        auto y = owned_array<float>({n, rows}, &out);
        {
            py::gil_scoped_release release;
            run_matmul(type_of(type_id), wp, size_t(w.nbytes()), rows, k, x.data(), n, out, path, split_sms,
                       split_invariant);
        }
        return y;
    }, py::arg("type_id"), py::arg("w"), py::arg("rows"), py::arg("k"), py::arg("x"), py::arg("path") = 0,
    py::arg("split_sms") = 0, py::arg("split_invariant") = false,
    "y[n, rows] = x @ W.T on the GPU; path 0 = as the model chooses, 1 = matrix-vector (n <= 8), 2 = tensor cores;\n"
    "split_sms > 0: the tensor cores split K as on a GPU of that many SMs (as the batch-invariant model does when\n"
    "split_invariant).");

    m.def("dequantize", [](int type_id, py::array w, int64_t n) {
        const uint8_t* wp = bytes_of(w, "w");
        float* out;
        auto y = owned_array<float>({py::ssize_t(n)}, &out);
        {
            py::gil_scoped_release release;
            run_dequantize(type_of(type_id), wp, size_t(w.nbytes()), n, out);
        }
        return y;
    }, py::arg("type_id"), py::arg("w"), py::arg("n"));

    m.def("host_row_dot", [](int type_id, py::array w, int k, Arr<float> x) {
        if (x.ndim() != 1 || x.size() != k) throw py::value_error("host_row_dot: x must have k elements");
        return host_row_dot(type_of(type_id), bytes_of(w, "w"), k, x.data());
    }, py::arg("type_id"), py::arg("w"), py::arg("k"), py::arg("x"),
    "The matrix-vector kernel's arithmetic for one row, run on the CPU (no GPU needed).");
    m.def("host_dequantize", [](int type_id, py::array w, int64_t n) {
        const uint8_t* wp = bytes_of(w, "w");
        float* out;
        auto y = owned_array<float>({py::ssize_t(n)}, &out);
        host_dequantize(type_of(type_id), wp, n, out);
        return y;
    }, py::arg("type_id"), py::arg("w"), py::arg("n"), "The tiles' dequantizer, run on the CPU (no GPU needed).");

    m.def("activation_format", [](int type_id) { return activation_format(type_of(type_id)); }, py::arg("type_id"),
          "The activation format of a weight type's products: 0 = Q8_0, 1 = Q8_1, 2 = Q8_K, -1 = float.");
    m.def("rmsnorm", [](Arr<float> x, Arr<float> w, float eps, int fmt) {
        if (x.ndim() != 2 || w.ndim() != 1 || w.size() != x.shape(1)) throw py::value_error("rmsnorm: x [n, k], w [k]");
        const int n = int(x.shape(0)), k = int(x.shape(1));
        float *yp, *dsp;
        int8_t* qp;
        auto y = owned_array<float>({n, k}, &yp);
        auto q = owned_array<int8_t>({n, k}, &qp);
        auto ds = owned_array<float>({n, k / 32, 2}, &dsp);
        {
            py::gil_scoped_release release;
            run_rmsnorm(x.data(), w.data(), n, k, eps, fmt, yp, qp, dsp);
        }
        return py::make_tuple(y, q, ds);
    }, py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("fmt") = 0,
    "(y, quants, (d, s) per 32) of rmsnorm(x) * w, quantized in activation format fmt.");
    m.def("quantize_activations", [](Arr<float> x, int fmt) {
        if (x.ndim() != 2) throw py::value_error("quantize_activations: x must be [n, k]");
        const int n = int(x.shape(0)), k = int(x.shape(1));
        float* dsp;
        int8_t* qp;
        auto q = owned_array<int8_t>({n, k}, &qp);
        auto ds = owned_array<float>({n, k / 32, 2}, &dsp);
        {
            py::gil_scoped_release release;
            run_quantize(x.data(), n, k, fmt, qp, dsp);
        }
        return py::make_tuple(q, ds);
    }, py::arg("x"), py::arg("fmt"), "(quants, (d, s) per 32) of x in activation format fmt, on the GPU.");

    m.def("rope_kv", [](Arr<float> qkv, Arr<int32_t> pos, int n_head, int n_head_kv, int head_dim, py::dict rope,
                        Arr<int32_t> block_table, Arr<uint16_t> k_cache, Arr<uint16_t> v_cache) {
        const int T = int(qkv.shape(0)), kv_dim = n_head_kv * head_dim;
        if (qkv.ndim() != 2 || qkv.shape(1) != (n_head + 2 * n_head_kv) * head_dim || pos.size() != T)
            throw py::value_error("rope_kv: qkv [T, (n_head + 2 n_head_kv) head_dim], pos [T]");
        if (k_cache.ndim() != 3 || k_cache.shape(2) != kv_dim || v_cache.ndim() != 3 ||
            v_cache.shape(0) != k_cache.shape(0) || v_cache.shape(1) != k_cache.shape(1) || v_cache.shape(2) != kv_dim)
            throw py::value_error("rope_kv: caches [n_blocks, block_size, kv_dim]");
        const int n_blocks = int(k_cache.shape(0)), bs = int(k_cache.shape(1));
        if (block_table.size() < n_blocks) throw py::value_error("rope_kv: block_table shorter than the cache");
        const RopeParams rp = rope_from(rope, head_dim);
        float* qp;
        uint16_t *kp, *vp;
        auto q_out = owned_array<float>({T, qkv.shape(1)}, &qp);
        auto k_out = owned_array<uint16_t>({n_blocks, bs, kv_dim}, &kp);
        auto v_out = owned_array<uint16_t>({n_blocks, bs, kv_dim}, &vp);
        std::copy(qkv.data(), qkv.data() + qkv.size(), qp);
        std::copy(k_cache.data(), k_cache.data() + k_cache.size(), kp);
        std::copy(v_cache.data(), v_cache.data() + v_cache.size(), vp);
        {
            py::gil_scoped_release release;
            run_rope_kv(qp, T, pos.data(), n_head, n_head_kv, head_dim, rp, block_table.data(), n_blocks, bs, kp, vp);
        }
        return py::make_tuple(q_out, k_out, v_out);
    }, py::arg("qkv"), py::arg("pos"), py::arg("n_head"), py::arg("n_head_kv"), py::arg("head_dim"), py::arg("rope"),
    py::arg("block_table"), py::arg("k_cache"), py::arg("v_cache"));

    m.def("attention", [](Arr<float> q, Arr<int32_t> pos, int n_head, int n_head_kv, int head_dim, float scale,
                          Arr<int32_t> block_table, Arr<uint16_t> k_cache, Arr<uint16_t> v_cache, int kernel,
                          int split_len, bool with_q8, int q8_fmt) {
        const int T = int(q.shape(0)), kv_dim = n_head_kv * head_dim;
        if (q.ndim() != 2 || q.shape(1) != n_head * head_dim || pos.size() != T)
            throw py::value_error("attention: q [T, n_head * head_dim], pos [T]");
        if (k_cache.ndim() != 3 || k_cache.shape(2) != kv_dim || v_cache.ndim() != 3 ||
            v_cache.shape(0) != k_cache.shape(0) || v_cache.shape(1) != k_cache.shape(1) || v_cache.shape(2) != kv_dim)
            throw py::value_error("attention: caches [n_blocks, block_size, kv_dim]");
        const int n_blocks = int(k_cache.shape(0)), bs = int(k_cache.shape(1));
        if (block_table.size() < n_blocks) throw py::value_error("attention: block_table shorter than the cache");
        float *op, *dsp = nullptr;
        int8_t* qp = nullptr;
        const int q_dim = n_head * head_dim;
        auto out = owned_array<float>({T, q_dim}, &op);
        py::object q8 = py::none(), ds = py::none();
        if (with_q8) {
            if (kernel != 0 || q_dim % 32) throw py::value_error("attention: with_q8 needs the decode kernel");
            q8 = owned_array<int8_t>({T, q_dim}, &qp);
            ds = owned_array<float>({T, q_dim / 32, 2}, &dsp);
        }
        {
            py::gil_scoped_release release;
            run_attention(q.data(), T, pos.data(), n_head, n_head_kv, head_dim, scale, block_table.data(), n_blocks, bs,
                          k_cache.data(), v_cache.data(), op, kernel, split_len, qp, dsp, q8_fmt);
        }
        if (with_q8) return py::object(py::make_tuple(out, q8, ds));
        return py::object(out);
    }, py::arg("q"), py::arg("pos"), py::arg("n_head"), py::arg("n_head_kv"), py::arg("head_dim"), py::arg("scale"),
    py::arg("block_table"), py::arg("k_cache"), py::arg("v_cache"), py::arg("kernel") = 0, py::arg("split_len") = 0,
    py::arg("with_q8") = false, py::arg("q8_fmt") = 0,
    "Attention of T queries of one sequence; kernel 0 = decode (split-K), 1 = prefill (tensor cores). with_q8: "
    "(out, q8, ds) with the output quantized per 32 as the decode kernel hands it on.");

    m.def("sample", [](Arr<float> logits, Arr<float> temperature, Arr<int32_t> top_k, Arr<float> top_p,
                       Arr<float> min_p, Arr<float> u) {
        if (logits.ndim() != 2) throw py::value_error("sample: logits must be [n, vocab]");
        const int n = int(logits.shape(0)), V = int(logits.shape(1));
        const auto p = params_from(n, temperature, top_k, top_p, min_p, u);
        int32_t* op;
        auto out = owned_array<int32_t>({n}, &op);
        {
            py::gil_scoped_release release;
            run_sample(logits.data(), n, V, p.data(), op);
        }
        return out;
    }, py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("u"));

    // ---- the model ----
    py::class_<DeviceKV>(m, "KVCache", "Paged F16 KV cache in device memory (the CPU cache's layout).")
        .def(py::init([](int n_layer, int kv_dim, int n_blocks, int block_size) {
            py::gil_scoped_release release;
            return new DeviceKV(n_layer, kv_dim, n_blocks, block_size);
        }), py::arg("n_layer"), py::arg("n_kv_dim"), py::arg("n_blocks"), py::arg("block_size") = 16)
        .def_property_readonly("n_layer", &DeviceKV::n_layer)
        .def_property_readonly("n_kv_dim", &DeviceKV::kv_dim)
        .def_property_readonly("n_blocks", &DeviceKV::n_blocks)
        .def_property_readonly("block_size", &DeviceKV::block_size)
        .def_property_readonly("nbytes", &DeviceKV::nbytes)
        .def("copy_block", [](DeviceKV& c, int src, int dst) {
            py::gil_scoped_release release;
            c.copy_block(src, dst);
        }, py::arg("src"), py::arg("dst"))
        .def("download_layer", [](const DeviceKV& c, int layer) {
            uint16_t *kp, *vp;
            auto k = owned_array<uint16_t>({c.n_blocks(), c.block_size(), c.kv_dim()}, &kp);
            auto v = owned_array<uint16_t>({c.n_blocks(), c.block_size(), c.kv_dim()}, &vp);
            {
                py::gil_scoped_release release;
                c.download_layer(layer, kp, vp);
            }
            return py::make_tuple(k, v);
        }, py::arg("layer"), "Host copies (uint16 half bits) of one layer's K and V: [n_blocks, block_size, kv_dim].");

    py::class_<ModelHandle>(m, "CudaModel", "A llama-family model on the GPU, weights in their GGUF block types.")
        .def(py::init([](py::dict config, py::dict globals, py::list layers, int n_ctx, int max_step_tokens,
                         bool batch_invariant, bool pdl) {
            const ModelConfig c = config_from(config);
            py::list keep;
            auto g = tensors_from(globals, keep);
            std::vector<std::map<std::string, HostTensor>> ls;
            for (auto layer : layers) ls.push_back(tensors_from(layer.cast<py::dict>(), keep));
            ModelOptions o;
            o.n_ctx = n_ctx;
            o.max_step_tokens = max_step_tokens;
            o.batch_invariant = batch_invariant;
            o.pdl = pdl;
            auto h = std::make_unique<ModelHandle>();
            {
                py::gil_scoped_release release;
                h->model = std::make_unique<CudaModel>(c, g, ls, o);
            }
            return h;
        }), py::arg("config"), py::arg("globals"), py::arg("layers"), py::arg("n_ctx") = 4096,
        py::arg("max_step_tokens") = 512, py::arg("batch_invariant") = false, py::arg("pdl") = true)
        .def_property_readonly("n_vocab", [](const ModelHandle& h) { return h.model->config().n_vocab; })
        .def_property_readonly("threads", [](const ModelHandle&) { return 0; }, "CPU threads of the step (none).")
        .def_property_readonly("n_ctx", [](const ModelHandle& h) { return h.model->options().n_ctx; })
        .def_property_readonly("weight_bytes", [](const ModelHandle& h) { return h.model->weight_bytes(); })
        .def_property_readonly("bytes_per_token", [](const ModelHandle& h) { return h.model->bytes_per_token(); })
        .def_property_readonly("scratch_bytes", [](const ModelHandle& h) { return h.model->scratch_bytes(); })
        .def("kv_blocks_for", [](const ModelHandle& h, size_t budget, int block_size) {
            return h.model->kv_blocks_for(budget, block_size);
        }, py::arg("budget_bytes"), py::arg("block_size") = 16)
        .def("forward", [](ModelHandle& h, DeviceKV& cache, Arr<int32_t> tokens, Arr<int32_t> seq_lens, Arr<int32_t> pos0,
                           py::list block_tables, Arr<int32_t> logit_rows) {
            BatchArgs a;
            batch_from(a, tokens, seq_lens, pos0, block_tables, logit_rows);
            float* out;
            auto result = owned_array<float>({py::ssize_t(a.b.n_logits), py::ssize_t(h.model->config().n_vocab)}, &out);
            {
                py::gil_scoped_release release;
                h.model->forward(cache, a.b, out);
            }
            return result;
        }, py::arg("cache"), py::arg("tokens"), py::arg("seq_lens"), py::arg("pos0"), py::arg("block_tables"),
        py::arg("logit_rows"), "One step with the CPU core's contract; returns float32 logits [len(logit_rows), n_vocab].")
        .def("forward_sample", [](ModelHandle& h, DeviceKV& cache, Arr<int32_t> tokens, Arr<int32_t> seq_lens,
                                  Arr<int32_t> pos0, py::list block_tables, Arr<int32_t> logit_rows,
                                  Arr<float> temperature, Arr<int32_t> top_k, Arr<float> top_p, Arr<float> min_p,
                                  Arr<float> u) {
            BatchArgs a;
            batch_from(a, tokens, seq_lens, pos0, block_tables, logit_rows);
            const auto p = params_from(a.b.n_logits, temperature, top_k, top_p, min_p, u);
            int32_t* out;
            auto result = owned_array<int32_t>({py::ssize_t(a.b.n_logits)}, &out);
            {
                py::gil_scoped_release release;
                h.model->forward_sample(cache, a.b, p.data(), out);
            }
            return result;
        }, py::arg("cache"), py::arg("tokens"), py::arg("seq_lens"), py::arg("pos0"), py::arg("block_tables"),
        py::arg("logit_rows"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"), py::arg("u"),
        "One step, sampling each logit row on the device; returns int32 tokens [len(logit_rows)].")
        .def("decode_greedy", [](ModelHandle& h, DeviceKV& cache, Arr<int32_t> tokens, Arr<int32_t> pos,
                                 py::list block_tables, int n_steps, bool use_graph) {
            const py::ssize_t B = tokens.size();
            if (tokens.ndim() != 1 || pos.ndim() != 1 || pos.size() != B || py::ssize_t(block_tables.size()) != B)
                throw py::value_error("decode_greedy: tokens, pos and block_tables need one entry per sequence");
            std::vector<Arr<int32_t>> tables;
            std::vector<const int32_t*> tp;
            std::vector<int32_t> nb;
            for (py::ssize_t b = 0; b < B; ++b) {
                auto bt = Arr<int32_t>::ensure(block_tables[size_t(b)]);
                if (!bt || bt.ndim() != 1) throw py::value_error("decode_greedy: block tables must be 1-D int arrays");
                tp.push_back(bt.data());
                nb.push_back(int32_t(bt.size()));
                tables.push_back(std::move(bt));
            }
            int32_t* out;
            auto result = owned_array<int32_t>({py::ssize_t(std::max(n_steps, 0)), B}, &out);
            {
                py::gil_scoped_release release;
                h.model->decode_greedy(cache, int(B), tokens.data(), pos.data(), tp.data(), nb.data(), n_steps, out,
                                       use_graph);
            }
            return result;
        }, py::arg("cache"), py::arg("tokens"), py::arg("pos"), py::arg("block_tables"), py::arg("n_steps"),
        py::arg("use_graph") = true,
        "n_steps greedy steps of B sequences on the device (CUDA graph); sequence b feeds tokens[b] at pos[b]. "
        "Returns int32 [n_steps, B].");
}
