// The Python module dnntrace._C: layout constants and the bucket mapping of csrc/core, so the
// Python mirror can be tested against the one C++ definition. The ops register themselves with
// torch.ops.dnntrace when this module is loaded.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>

#include "../core/loglinear.h"
#include "../core/summary_cpu.h"

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

// Header counts and moments of vector rows (n rows back to back in `flat`, row i of lengths[i]
// values), as the writer thread stores them: count, calls = 1, NaN, +/-Inf, zeros, negatives,
// finite sum and sum of squares, finite min/max. One pass, without the GIL.
py::tuple vector_row_stats(py::array_t<float, py::array::c_style | py::array::forcecast> flat,
                           py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths,
                           int width) {
  if (width < kHeader) throw py::value_error("width must be at least the header's");
  const py::ssize_t n = lengths.size();
  const int64_t* len = lengths.data();
  int64_t total = 0;
  for (py::ssize_t i = 0; i < n; ++i) {
    if (len[i] < 0) throw py::value_error("negative length");
    total += len[i];
  }
  if (total != flat.size()) throw py::value_error("lengths do not add up to the values");
  py::array_t<int64_t> counts({n, static_cast<py::ssize_t>(width)});
  py::array_t<double> moments({n, static_cast<py::ssize_t>(kNumMoments)});
  int64_t* c = counts.mutable_data();
  double* mo = moments.mutable_data();
  const float* v = flat.data();
  {
    py::gil_scoped_release release;
    std::fill(c, c + n * width, int64_t{0});
    std::fill(mo, mo + n * kNumMoments, 0.0);
    for (py::ssize_t i = 0; i < n; v += len[i], ++i) {
      int64_t* ci = c + i * width;
      double* mi = mo + i * kNumMoments;
      int64_t nan = 0, pinf = 0, ninf = 0, zeros = 0, neg = 0;
      double sum = 0.0, sq = 0.0, mn = __builtin_huge_val(), mx = -__builtin_huge_val();
      for (int64_t j = 0; j < len[i]; ++j) {
        const double x = v[j];
        nan += x != x;
        pinf += x == __builtin_huge_val();
        ninf += x == -__builtin_huge_val();
        zeros += x == 0.0;
        neg += x < 0.0;
        const bool fin = x - x == 0.0;  // false for NaN and +/-Inf
        sum += fin ? x : 0.0;
        sq += fin ? x * x : 0.0;
        mn = fin && x < mn ? x : mn;
        mx = fin && x > mx ? x : mx;
      }
      ci[kCount] = len[i];
      ci[kCalls] = 1;
      ci[kNan] = nan;
      ci[kPosInf] = pinf;
      ci[kNegInf] = ninf;
      ci[kZeros] = zeros;
      ci[kNegatives] = neg;
      mi[kSum] = sum;
      mi[kSumSq] = sq;
      mi[kMin] = mn;
      mi[kMax] = mx;
    }
  }
  return py::make_tuple(counts, moments);
}

}  // namespace

void init_rows(py::module_& m);
void init_watch(py::module_& m);

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
  m.def("vector_row_stats", &vector_row_stats, py::arg("flat"), py::arg("lengths"),
        py::arg("width"), "(counts [n, width], moments) of vector rows stored back to back.");
  m.def("half_bits_to_float", &half_bits_to_float_np, py::arg("bits"), py::arg("bf16") = false,
        "The shared host/device fp16/bf16 -> fp32 conversion.");
  m.def("cpu_kernel_isa", &block_fused_isa,
        "Which CPU summary kernel runs here: 'avx512', 'avx2' or 'baseline' (capped by "
        "DNNTRACE_CPU_ISA=baseline|avx2|avx512; DNNTRACE_CPU_BASELINE=1 is 'baseline').");
  init_rows(m);
  init_watch(m);
}
