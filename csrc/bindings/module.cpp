// The Python module dnntrace._C: layout constants and the bucket mapping of csrc/core, so the
// Python mirror can be tested against the one C++ definition. The ops register themselves with
// torch.ops.dnntrace when this module is loaded.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "../core/loglinear.h"

namespace py = pybind11;
using namespace dnntrace::core;

namespace {

py::array_t<int32_t> row_indices_f32(
    py::array_t<float, py::array::c_style | py::array::forcecast> x, int k, int emin, int octaves) {
  const HistLayout l{k, emin, octaves};
  if (const char* err = validate_layout(l)) throw py::value_error(err);
  py::array_t<int32_t> out(x.size());
  auto* o = out.mutable_data();
  const float* p = x.data();
  for (py::ssize_t i = 0; i < x.size(); ++i) o[i] = row_index(p[i], l);
  return out;
}

py::array_t<int32_t> row_indices_f64(
    py::array_t<double, py::array::c_style | py::array::forcecast> x, int k, int emin,
    int octaves) {
  const HistLayout l{k, emin, octaves};
  if (const char* err = validate_layout(l)) throw py::value_error(err);
  py::array_t<int32_t> out(x.size());
  auto* o = out.mutable_data();
  const double* p = x.data();
  for (py::ssize_t i = 0; i < x.size(); ++i) o[i] = row_index(p[i], l);
  return out;
}

py::array_t<float> half_bits_to_float_np(py::array_t<uint16_t, py::array::c_style> h, bool bf16) {
  py::array_t<float> out(h.size());
  auto* o = out.mutable_data();
  for (py::ssize_t i = 0; i < h.size(); ++i)
    o[i] = bf16 ? bf16_bits_to_float(h.data()[i]) : half_bits_to_float(h.data()[i]);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dnntrace native core";
  py::dict count_fields;
  for (auto [name, v] : {std::pair{"COUNT", kCount},
                         {"NAN", kNan},
                         {"POSINF", kPosInf},
                         {"NEGINF", kNegInf},
                         {"ZEROS", kZeros},
                         {"NEGATIVES", kNegatives},
                         {"UNDER_POS", kUnderPos},
                         {"UNDER_NEG", kUnderNeg},
                         {"OVER_POS", kOverPos},
                         {"OVER_NEG", kOverNeg},
                         {"CALLS", kCalls},
                         {"HEADER", kHeader}})
    count_fields[name] = static_cast<int>(v);
  m.attr("COUNT_FIELDS") = count_fields;
  py::dict moment_fields;
  for (auto [name, v] : {std::pair{"SUM", kSum},
                         {"SUM_COMP", kSumComp},
                         {"SUMSQ", kSumSq},
                         {"SUMSQ_COMP", kSumSqComp},
                         {"MIN", kMin},
                         {"MAX", kMax},
                         {"NUM_MOMENTS", kNumMoments}})
    moment_fields[name] = static_cast<int>(v);
  m.attr("MOMENT_FIELDS") = moment_fields;
  m.attr("DEFAULT_K") = kDefaultMantissaBits;
  m.attr("DEFAULT_EMIN") = kDefaultMinExponent;
  m.attr("DEFAULT_OCTAVES") = kDefaultOctaves;
#ifdef DNNTRACE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("row_indices_f32", &row_indices_f32, py::arg("x"), py::arg("k"), py::arg("emin"),
        py::arg("octaves"), "Row index of each value, by the C++ mapping (fp32 bits).");
  m.def("row_indices_f64", &row_indices_f64, py::arg("x"), py::arg("k"), py::arg("emin"),
        py::arg("octaves"), "Row index of each value, by the C++ mapping (fp64 bits).");
  m.def("half_bits_to_float", &half_bits_to_float_np, py::arg("bits"), py::arg("bf16") = false,
        "The shared host/device fp16/bf16 -> fp32 conversion.");
}
