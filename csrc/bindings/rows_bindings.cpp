// dnntrace._C.compact_rows: the writer's row building (histogram spans, header fields) in C++,
// without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "../core/compact.h"
#include "../core/loglinear.h"

namespace py = pybind11;
using namespace dnntrace::core;

namespace {

using I64 = py::array_t<int64_t, py::array::c_style>;
using F64 = py::array_t<double, py::array::c_style>;

py::tuple compact_rows(I64 counts, F64 moments, I64 rows, bool reset) {
  if (counts.ndim() != 2 || counts.shape(1) <= kHeader)
    throw py::value_error("counts must be int64[slots, width > 16]");
  if (moments.ndim() != 2 || moments.shape(0) != counts.shape(0) || moments.shape(1) != kNumMoments)
    throw py::value_error("moments must be float64[slots, 8] with the slots of counts");
  const int64_t slots = counts.shape(0), width = counts.shape(1), m = rows.size();
  const int64_t* r = rows.data();
  for (int64_t i = 0; i < m; ++i)
    if (r[i] < 0 || r[i] >= slots) throw py::index_error("row index out of the bank");
  py::array_t<int32_t> first(m);
  py::array_t<int64_t> offsets(m + 1);
  py::array_t<int64_t> header({m, static_cast<int64_t>(kHeader)});
  py::array_t<double> mom({m, static_cast<int64_t>(kNumMoments)});
  int64_t* c = counts.mutable_data();
  double* mo = moments.mutable_data();
  int32_t* f = first.mutable_data();
  int64_t* off = offsets.mutable_data();
  int64_t total;
  {
    py::gil_scoped_release release;
    total = compact_bounds(c, width, r, m, f, off);
  }
  py::array_t<uint32_t> values(total);
  uint32_t* v = values.mutable_data();
  int64_t* h = header.mutable_data();
  double* mout = mom.mutable_data();
  bool ok;
  int64_t nonzero = 0;
  {
    py::gil_scoped_release release;
    ok = compact_copy(c, mo, width, r, m, f, off, h, mout, v, reset, &nonzero);
  }
  if (!ok) throw std::overflow_error("a histogram bucket exceeds 2**32 - 1 in one step");
  return py::make_tuple(header, mom, first, offsets, values, nonzero);
}

}  // namespace

void init_rows(py::module_& m) {
  m.def("compact_rows", &compact_rows, py::arg("counts"), py::arg("moments"), py::arg("rows"),
        py::arg("reset") = false,
        "(header int64[m,16], moments float64[m,8], hist_offset int32[m], offsets int64[m+1], "
        "values uint32, non-zero buckets) of bank rows `rows`: each histogram's non-zero span; "
        "reset=True clears the rows. OverflowError if a bucket exceeds 2**32 - 1.");
}
