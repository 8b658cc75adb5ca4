// dnntrace._C.compact_rows: the writer's row building (histogram spans, header fields) in C++,
// without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../core/compact.h"
#include "../core/loglinear.h"

namespace py = pybind11;
using namespace dnntrace::core;

namespace {

// The buckets read on each side of a predicted gap, beyond the last data (GapHint::margin): 6
// octaves. The smallest magnitude of n values near zero moves by a factor below 2^6 from one
// step to the next in all but ~2 % of the bench transformer's rows (bench/NOTES.md).
constexpr int kGapMarginOctaves = 6;

using I64 = py::array_t<int64_t, py::array::c_style>;
using F64 = py::array_t<double, py::array::c_style>;

py::tuple compact_rows(I64 counts, F64 moments, I64 rows, bool reset, py::object layout,
                       py::object out, py::object out_index, int64_t at, py::object inner) {
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
  if (width - kHeader > 65536)
    throw py::value_error("rows of more than 65536 buckets do not fit uint16 bucket indices");
  std::vector<int32_t> first(static_cast<size_t>(m));
  std::vector<int64_t> spans(static_cast<size_t>(m + 1));
  py::array_t<int64_t> pairs(m + 1);
  py::array_t<int64_t> header({m, static_cast<int64_t>(kHeader)});
  py::array_t<double> mom({m, static_cast<int64_t>(kNumMoments)});
  int64_t* c = counts.mutable_data();
  double* mo = moments.mutable_data();
  int32_t* f = first.data();
  int64_t* sp = spans.data();
  int64_t* pr = pairs.mutable_data();
  int64_t* h = header.mutable_data();
  double* mout = mom.mutable_data();
  sp[0] = 0;
  pr[0] = 0;
  int64_t total;
  {
    py::gil_scoped_release release;
    total = compact_bounds(c, mo, width, r, 0, m, hint, f, sp);
  }
  // The pairs go to out[at:] / out_index[at:] when the spans fit there (the writer's reused
  // window: no fresh pages to fault in per step), else to new arrays.
  using U32 = py::array_t<uint32_t, py::array::c_style>;
  using U16 = py::array_t<uint16_t, py::array::c_style>;
  U32 values;
  U16 index;
  int64_t base = 0;
  bool in_out = false;
  if (!out.is_none() || !out_index.is_none()) {
    if (!py::isinstance<U32>(out) || !py::isinstance<U16>(out_index))
      throw py::value_error("out and out_index must be contiguous uint32 and uint16 arrays");
    auto vb = out.cast<U32>();
    auto ib = out_index.cast<U16>();
    if (vb.ndim() != 1 || ib.ndim() != 1 || !vb.writeable() || !ib.writeable() || at < 0 ||
        vb.shape(0) != ib.shape(0))
      throw py::value_error("out and out_index must be writable 1-d arrays of one length, at >= 0");
    if (at + total <= vb.shape(0)) {
      values = vb;
      index = ib;
      base = at;
      in_out = true;
    }
  }
  if (!in_out) {
    values = U32(total);
    index = U16(total);
  }
  // The gap prediction (GapHint): only with a layout, whose min/max bounds are checked.
  GapHint gap{};
  const GapHint* gp = nullptr;
  if (!inner.is_none()) {
    using I32 = py::array_t<int32_t, py::array::c_style>;
    if (!py::isinstance<I32>(inner))
      throw py::value_error("inner must be a contiguous int32 array");
    auto ib = inner.cast<I32>();
    if (ib.ndim() != 2 || ib.shape(1) != 2 || !ib.writeable())
      throw py::value_error("inner must be a writable int32[slots, 2]");
    if (hint != nullptr) {
      gap = GapHint{ib.mutable_data(), ib.shape(0), lay.per_sign(), kGapMarginOctaves << lay.k};
      gp = &gap;
    }
  }
  int64_t scanned = 0, room = total;
  uint32_t* vd = values.mutable_data() + base;
  uint16_t* id = index.mutable_data() + base;
  CopyResult res;
  {
    py::gil_scoped_release release;
    res = compact_copy(c, mo, width, r, 0, m, f, sp, h, mout, id, vd, pr, reset, hint != nullptr,
                       gp, &scanned);
  }
  if (res.status == CopyStatus::kSpanShort) {
    // A hinted span missed buckets (moments that do not bound the histogram): rows from here
    // on are scanned, the rows before keep their pairs.
    const int64_t done = pr[res.row];
    sp[res.row] = 0;
    int64_t rest;
    {
      py::gil_scoped_release release;
      rest = compact_bounds(c, mo, width, r, res.row, m, nullptr, f, sp);
    }
    room = done + rest;
    U32 grown_v(room);  // (rare: never in out)
    U16 grown_i(room);
    std::copy(vd, vd + done, grown_v.mutable_data());
    std::copy(id, id + done, grown_i.mutable_data());
    values = grown_v;
    index = grown_i;
    base = 0;
    vd = values.mutable_data();
    id = index.mutable_data();
    {
      py::gil_scoped_release release;
      res = compact_copy(c, mo, width, r, res.row, m, f, sp, h, mout, id, vd, pr, reset, false,
                         nullptr, &scanned);
    }
  }
  if (res.status == CopyStatus::kOverflow)
    throw std::overflow_error("a histogram bucket exceeds 2**32 - 1 in one step");
  const int64_t n = pr[m];
  py::slice used(base, base + n, 1);
  return py::make_tuple(header, mom, pairs, index[used], values[used], room, scanned);
}

}  // namespace

void init_rows(py::module_& m) {
  m.def("compact_rows", &compact_rows, py::arg("counts"), py::arg("moments"), py::arg("rows"),
        py::arg("reset") = false, py::arg("layout") = py::none(), py::arg("out") = py::none(),
        py::arg("out_index") = py::none(), py::arg("at") = 0, py::arg("inner") = py::none(),
        "(header int64[m,16], moments float64[m,8], pairs int64[m+1], bucket uint16, count uint32, "
        "room, buckets read) of bank rows `rows`: row i's non-zero histogram buckets are "
        "bucket[pairs[i]:pairs[i+1]] (ascending) with their counts; reset=True clears the rows. "
        "layout=(k, emin, octaves) bounds each row's scan by its header and min/max (checked: a "
        "short span is rescanned). bucket/count are views of out_index[at:]/out[at:] when the "
        "rows' spans fit there (room: the pairs they may need). inner (int32[slots, 2], with "
        "layout): where each row's data "
        "was at the last call, to skip the gap between its signs (checked: a row that missed "
        "values is read in full), updated. OverflowError if a bucket exceeds 2**32 - 1.");
}
