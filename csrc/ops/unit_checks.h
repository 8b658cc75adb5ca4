// Shapes and argument checks of the per-unit ops, shared by the CPU kernels and the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "../core/units.h"

namespace dnntrace::ops {

// A tensor read as (outer, units, inner) around its unit axis.
struct UnitShape {
  int64_t outer, units, inner;
};

inline UnitShape unit_shape(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.dim() >= 1, "dnntrace: per-unit statistics need at least one dimension");
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  TORCH_CHECK(d >= 0 && d < x.dim(), "dnntrace: unit dim ", dim, " out of range for ", x.sizes());
  UnitShape s{1, x.size(d), 1};
  for (int64_t i = 0; i < d; ++i) s.outer *= x.size(i);
  for (int64_t i = d + 1; i < x.dim(); ++i) s.inner *= x.size(i);
  return s;
}

// The tensor to read and its (outer, units, inner) shape in memory order. Contiguous tensors are
// read in place; so are channels_last (3d) maps with units on dim 1, whose memory order is
// (N*H*W, C, 1): the same rows layout as a Linear output. Anything else is copied once.
struct UnitView {
  at::Tensor t;
  UnitShape s;   // in memory order
  int64_t rows;  // the logical outer size (samples or tokens), for the gradients' rows
  bool channels_last;
};

inline UnitView unit_view(const at::Tensor& x, int64_t dim) {
  const UnitShape s = unit_shape(x, dim);
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  if (!x.is_contiguous() && d == 1 && (x.dim() == 4 || x.dim() == 5)) {
    const auto fmt =
        x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    if (x.is_contiguous(fmt)) return {x, {x.numel() / s.units, s.units, 1}, s.outer, true};
  }
  return {x.contiguous(), s, s.outer, false};
}

// y (the activation of a gradient's attribution) in the memory layout of v, as `dtype`.
inline at::Tensor same_layout(const at::Tensor& y, const UnitView& v, at::ScalarType dtype) {
  const at::Tensor c = y.to(dtype);
  if (!v.channels_last) return c.contiguous();
  return c.contiguous(c.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                   : at::MemoryFormat::ChannelsLast3d);
}

inline void check_unit_acc(const at::Tensor& acc, const at::Tensor& x, int64_t units, int cols,
                           const char* op) {
  TORCH_CHECK(acc.scalar_type() == at::kDouble && acc.dim() == 2 && acc.is_contiguous() &&
                  acc.size(0) == units && acc.size(1) == cols,
              "dnntrace: ", op, ": acc must be a contiguous float64 tensor [", units, ", ", cols,
              "], got ", acc.scalar_type(), " ", acc.sizes());
  TORCH_CHECK(acc.device() == x.device(), "dnntrace: ", op, ": acc on ", acc.device(),
              " but input on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "dnntrace: ", op,
              ": expected a floating tensor, got ", x.scalar_type());
}

// True when x is given; checks it matches g.
inline bool check_unit_grad_x(const at::Tensor& g, const std::optional<at::Tensor>& x) {
  if (!x.has_value() || !x->defined()) return false;
  TORCH_CHECK(x->sizes() == g.sizes(), "dnntrace: unit_grad_summary_out: x ", x->sizes(), " and g ",
              g.sizes(), " differ in shape");
  TORCH_CHECK(x->device() == g.device(), "dnntrace: unit_grad_summary_out: x on ", x->device(),
              " but g on ", g.device());
  TORCH_CHECK(at::isFloatingType(x->scalar_type()),
              "dnntrace: unit_grad_summary_out: expected a floating x, got ", x->scalar_type());
  return true;
}

inline void check_unit_topk(const at::Tensor& samples, const at::Tensor& sample_ids,
                            const at::Tensor& values, const at::Tensor& ids,
                            const at::Tensor& steps) {
  TORCH_CHECK(samples.dim() == 2 && at::isFloatingType(samples.scalar_type()),
              "dnntrace: unit_topk_update: samples must be a floating [batch, units] tensor, got ",
              samples.scalar_type(), " ", samples.sizes());
  TORCH_CHECK(sample_ids.dim() == 1 && sample_ids.size(0) == samples.size(0),
              "dnntrace: unit_topk_update: ids must be [", samples.size(0), "], got ",
              sample_ids.sizes());
  for (const at::Tensor* t : {&values, &ids, &steps}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous() &&
                    t->size(0) == samples.size(1) && t->sizes() == values.sizes(),
                "dnntrace: unit_topk_update: values, ids and steps must be contiguous float32 [",
                samples.size(1), ", k] tensors, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(t->device() == samples.device() && sample_ids.device() == samples.device(),
                "dnntrace: unit_topk_update: all tensors must be on ", samples.device());
  }
  TORCH_CHECK(values.size(1) >= 1 && values.size(1) <= core::kMaxUnitTopK,
              "dnntrace: unit_topk_update: k must be in [1, ", core::kMaxUnitTopK, "], got ",
              values.size(1));
}

}  // namespace dnntrace::ops
