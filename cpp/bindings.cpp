// The one pybind11 file: arrays are checked while the GIL is held, the GIL is released only around compute,
// and results come back as numpy arrays that own their buffer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "matmul.h"
#include "threadpool.h"

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

    m.def("matmul", [](int type_id, py::array_t<uint8_t, py::array::c_style> w, int64_t rows, int64_t k,
                       py::array_t<float, py::array::c_style | py::array::forcecast> x, std::optional<std::string> isa) {
        const Isa level = isa_arg(isa);
        const Type wtype = type_arg(type_id);
        const TypeTraits& t = traits(wtype, level);
        if (!t.vec_dot) throw py::value_error(std::string("no dot product for type ") + t.name);
        if (rows < 1) throw py::value_error("rows must be >= 1");
        if (size_t(w.size()) != row_bytes(t, k) * size_t(rows))
            throw py::value_error("w: expected rows * row bytes = " + std::to_string(row_bytes(t, k) * size_t(rows)) +
                                  " bytes, got " + std::to_string(w.size()));
        if (x.ndim() != 2 || x.shape(1) != k) throw py::value_error("x must have shape (n, k)");
        const int64_t n = x.shape(0);
        float* out;
        auto result = owned_array<float>({py::ssize_t(n), py::ssize_t(rows)}, &out);
        const uint8_t* wp = w.data();
        const float* xp = x.data();
        {
            py::gil_scoped_release release;
            std::vector<uint8_t> scratch;
            matmul(default_pool(), wtype, wp, rows, k, xp, n, out, rows, scratch, level);
        }
        return result;
    }, py::arg("type_id"), py::arg("w"), py::arg("rows"), py::arg("k"), py::arg("x"), py::arg("isa") = py::none(),
    "y[n, rows] = x[n, k] @ W[rows, k].T with W in GGUF blocks, multithreaded on the default pool.");
}
