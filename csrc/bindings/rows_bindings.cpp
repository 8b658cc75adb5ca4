// dnntrace._C.compact_rows: the writer's row building (histogram spans, header fields) in C++,
// without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <tuple>

#include "../core/compact.h"
#include "../core/loglinear.h"

namespace py = pybind11;
using namespace dnntrace::core;

namespace {

using I64 = py::array_t<int64_t, py::array::c_style>;
using F64 = py::array_t<double, py::array::c_style>;

py::tuple compact_rows(I64 counts, F64 moments, I64 rows, bool reset, py::object layout,
                       py::object out, int64_t at) {
  if (counts.ndim() != 2 || counts.shape(1) <= kHeader)
    throw py::value_error("counts must be int64[slots, width > 16]");
  if (moments.ndim() != 2 || moments.shape(0) != counts.shape(0) || moments.shape(1) != kNumMoments)
    throw py::value_error("moments must be float64[slots, 8] with the slots of counts");
  const int64_t slots = counts.shape(0), width = counts.shape(1), m = rows.size();
  HistLayout lay{};
  const HistLayout* hint = nullptr;
  if (!layout.is_none()) {
    auto t = layout.cast<std::tuple<int, int, int>>();
    lay = HistLayout{std::get<0>(t), std::get<1>(t), std::get<2>(t)};
    if (const char* err = validate_layout(lay)) throw py::value_error(err);
    if (lay.width() != width) throw py::value_error("layout does not match the row width");
    hint = &lay;
  }
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
  int64_t* h = header.mutable_data();
  double* mout = mom.mutable_data();
  off[0] = 0;
  int64_t total;
  {
    py::gil_scoped_release release;
    total = compact_bounds(c, mo, width, r, 0, m, hint, f, off);
  }
  // The spans go to out[at:at + total] when they fit (the writer's reused window: no fresh
  // pages to fault in per step), else to a new array.
  py::array_t<uint32_t> values;
  bool in_out = false;
  if (!out.is_none()) {
    using U32 = py::array_t<uint32_t, py::array::c_style>;
    if (!py::isinstance<U32>(out)) throw py::value_error("out must be a contiguous uint32 array");
    auto buf = out.cast<U32>();
    if (buf.ndim() != 1 || !buf.writeable() || at < 0)
      throw py::value_error("out must be a writable uint32[n] and at >= 0");
    if (at + total <= buf.shape(0)) {
      values = buf[py::slice(at, at + total, 1)].cast<py::array_t<uint32_t>>();
      in_out = true;
    }
  }
  if (!in_out) values = py::array_t<uint32_t>(total);
  int64_t nonzero = 0;
  CopyResult res;
  {
    py::gil_scoped_release release;
    res = compact_copy(c, mo, width, r, 0, m, f, off, h, mout, values.mutable_data(), reset,
                       hint != nullptr, &nonzero);
  }
  if (res.status == CopyStatus::kSpanShort) {
    // A hinted span missed buckets (moments that do not bound the histogram): rows from here
    // on are scanned, the rows before keep their spans.
    const int64_t done = off[res.row];
    {
      py::gil_scoped_release release;
      compact_bounds(c, mo, width, r, res.row, m, nullptr, f, off);
    }
    py::array_t<uint32_t> grown(off[m]);  // (rare: never in out)
    std::copy(values.data(), values.data() + done, grown.mutable_data());
    values = grown;
    {
      py::gil_scoped_release release;
      res = compact_copy(c, mo, width, r, res.row, m, f, off, h, mout, values.mutable_data(), reset,
                         false, &nonzero);
    }
  }
  if (res.status == CopyStatus::kOverflow)
    throw std::overflow_error("a histogram bucket exceeds 2**32 - 1 in one step");
  return py::make_tuple(header, mom, first, offsets, values, nonzero);
}

}  // namespace

void init_rows(py::module_& m) {
  m.def("compact_rows", &compact_rows, py::arg("counts"), py::arg("moments"), py::arg("rows"),
        py::arg("reset") = false, py::arg("layout") = py::none(), py::arg("out") = py::none(),
        py::arg("at") = 0,
        "(header int64[m,16], moments float64[m,8], hist_offset int32[m], offsets int64[m+1], "
        "values uint32, non-zero buckets) of bank rows `rows`: each histogram's non-zero span; "
        "reset=True clears the rows. layout=(k, emin, octaves) bounds each span by the row's "
        "header and min/max instead of scanning (checked: a short span is rescanned). values "
        "is a view of out[at:] (uint32) when the spans fit there. "
        "OverflowError if a bucket exceeds 2**32 - 1.");
}
