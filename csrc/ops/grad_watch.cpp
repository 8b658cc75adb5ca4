// Native recording of activations and their gradients (see grad_watch.h), and its ops:
//   dnntrace::record_output(Tensor x, int watch, int act_slot, int grad_slot) -> ()
//   dnntrace::watch_grad(Tensor t, int watch, int slot) -> ()
//   dnntrace::watch_set_bank(int watch, Tensor counts, Tensor moments, int k, int emin,
//                            int octaves) -> Tensor (rows touched in the previous bank)
#include "grad_watch.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <exception>

#include "../core/compact.h"
#include "../core/loglinear.h"

namespace dnntrace::ops {
namespace {

std::mutex g_mu;
std::unordered_map<int64_t, std::shared_ptr<Watch>> g_watches;
int64_t g_next = 1;

const char* dtype_name(int8_t t) {
  switch (static_cast<at::ScalarType>(t)) {
    case at::kFloat:
      return "float32";
    case at::kDouble:
      return "float64";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    default:
      return "unknown";
  }
}

}  // namespace

int64_t register_watch(std::shared_ptr<Watch> w) {
  std::lock_guard<std::mutex> lock(g_mu);
  const int64_t id = g_next++;
  g_watches[id] = std::move(w);
  return id;
}

void unregister_watch(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_watches.erase(id);
}

std::shared_ptr<Watch> find_watch(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_watches.find(id);
  return it == g_watches.end() ? nullptr : it->second;
}

std::vector<int64_t> Watch::set_bank(const at::Tensor& counts, const at::Tensor& moments, int64_t k,
                                     int64_t emin, int64_t octaves) {
  std::lock_guard<std::mutex> lock(mu_);
  // Under the lock, so no hook lands between: pending merges go into the bank they were queued
  // for, and the rows touched since the last drain are handed back with it.
  merge_pending_locked();
  counts_ = counts;
  moments_ = moments;
  k_ = k;
  emin_ = emin;
  octaves_ = octaves;
  std::vector<int64_t> out;
  out.swap(touched_);
  return out;
}

void Watch::watch(const at::Tensor& t, int64_t slot) {
  // The hook holds the watch weakly: a closed tracer's pending hooks do nothing.
  std::weak_ptr<Watch> self = weak_from_this();
  t.register_hook([self, slot](const at::Tensor& grad) {
    const auto t0 = std::chrono::steady_clock::now();
    if (auto w = self.lock()) {
      w->accumulate(grad, slot);
      const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - t0)
                          .count();
      w->hook_calls_.fetch_add(1, std::memory_order_relaxed);
      w->hook_ns_.fetch_add(ns, std::memory_order_relaxed);
    }
  });
}

void Watch::accumulate(const at::Tensor& x, int64_t slot) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!enabled_ || !counts_.defined() || !x.defined()) return;
  accumulate_or_fail_locked(x, slot);
}

void Watch::accumulate_or_fail_locked(const at::Tensor& x, int64_t slot) {
  try {
    accumulate_locked(x, slot);
  } catch (const std::exception& e) {
    fail_locked(e.what());
  } catch (...) {
    fail_locked("unknown error");
  }
}

void Watch::record(const at::Tensor& x, int64_t act_slot, int64_t grad_slot) {
  bool hook = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!enabled_ || !counts_.defined() || !x.defined() || x.device() != counts_.device()) return;
    if (act_slot >= 0) accumulate_or_fail_locked(x, act_slot);
    hook = grad_slot >= 0 && enabled_ && x.requires_grad();
  }
  if (hook) watch(x, grad_slot);  // outside the lock: the hook may run at once on another thread
}

void Watch::fail_locked(const char* what) {
  enabled_ = false;
  if (error_.empty()) error_ = what;
}

void Watch::accumulate_locked(const at::Tensor& x, int64_t slot) {
  if (x.device() != counts_.device()) return;  // another device than the bank's: not traced
  TORCH_CHECK(slot >= 0 && slot < counts_.size(0), "dnntrace: slot ", slot, " outside the bank");
  const size_t s = static_cast<size_t>(slot);
  if (s >= adds_.size()) {  // a new (or grown) bank: room for every row
    const size_t rows = static_cast<size_t>(counts_.size(0));
    adds_.resize(rows, 0);
    is_source_.resize(rows, 0);
    meta_.resize(rows, {int8_t{-1}, {}});
  }
  if (is_source_[s]) apply_locked();  // its pending copies first: the row will change
  const auto dtype = static_cast<int8_t>(x.scalar_type());
  auto& m = meta_[s];
  if (m.first != dtype || !x.sizes().equals(m.second)) {
    m = {dtype, x.sizes().vec()};
    meta_dirty_.push_back(slot);
  }
  touched_.push_back(slot);
  recorded_ = true;
  if (x.is_inference()) {  // no version counter: read it
    read_locked(x, slot);
    ++adds_[s];
    return;
  }
  Key key{reinterpret_cast<intptr_t>(x.data_ptr()), dtype, static_cast<int64_t>(x._version()), {}};
  key.dims.append(x.sizes().begin(), x.sizes().end());
  key.dims.append(x.strides().begin(), x.strides().end());
  auto it = seen_.find(key);
  if (it != seen_.end() && !it->second.impl.expired() && adds_[it->second.slot] == 1) {
    const int64_t src = it->second.slot;
    pending_.emplace_back(src, slot);
    is_source_[src] = 1;
    ++reads_saved_;
    bytes_saved_ += x.numel() * static_cast<int64_t>(x.element_size());
  } else {
    read_locked(x, slot);
    seen_.insert_or_assign(std::move(key),
                           Seen{c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
                                    x.getIntrusivePtr()),
                                slot});
  }
  ++adds_[s];
}

void Watch::read_locked(const at::Tensor& x, int64_t slot) {
  if (stub_) return;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dnntrace::tensor_summary_out", "")
                       .typed<void(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, bool,
                                   at::Tensor&, at::Tensor&)>();
  op.call(x, slot, k_, emin_, octaves_, true, counts_, moments_);
}

void Watch::apply_locked() {
  if (pending_.empty()) return;
  const int64_t m = static_cast<int64_t>(pending_.size());
  std::vector<int64_t> idx(2 * m);
  for (int64_t i = 0; i < m; ++i) {
    idx[i] = pending_[i].first;
    idx[m + i] = pending_[i].second;
  }
  for (const auto& pr : pending_) is_source_[pr.first] = 0;
  pending_.clear();
  if (counts_.device().is_cpu() && !device_ops_) {  // one native pass (the ops' bits)
    TORCH_CHECK(counts_.is_contiguous() && moments_.is_contiguous(), "dnntrace: bank layout");
    core::merge_rows(counts_.data_ptr<int64_t>(), moments_.data_ptr<double>(), counts_.size(1),
                     idx.data(), idx.data() + m, m);
    return;
  }
  // StatBank.merge_rows_ops as ATen ops on the bank's device (no sync)
  auto index = at::tensor(idx, at::kLong);
  if (!counts_.device().is_cpu()) index = index.pin_memory().to(counts_.device(), true);
  auto s = index.narrow(0, 0, m), d = index.narrow(0, m, m);
  auto c = counts_.index_select(0, s);
  auto mo = moments_.index_select(0, s);
  auto lo = mo.select(1, core::kMin).clone();
  auto hi = mo.select(1, core::kMax).clone();
  mo.narrow(1, core::kMin, 2).zero_();
  counts_.index_add_(0, d, c);
  moments_.index_add_(0, d, mo);
  moments_.select(1, core::kMin).scatter_reduce_(0, d, lo, "amin");
  moments_.select(1, core::kMax).scatter_reduce_(0, d, hi, "amax");
}

void Watch::merge_pending_locked() {
  try {
    if (counts_.defined()) apply_locked();
  } catch (const std::exception& e) {
    fail_locked(e.what());
  }
  for (const auto& pr : pending_) is_source_[pr.first] = 0;
  pending_.clear();  // merged, or dropped with the watch disabled
}

void Watch::apply() {
  std::lock_guard<std::mutex> lock(mu_);
  merge_pending_locked();
}

void Watch::end_step() {
  std::lock_guard<std::mutex> lock(mu_);
  merge_pending_locked();
  seen_.clear();
  std::fill(adds_.begin(), adds_.end(), 0);
}

void Watch::set_enabled(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  enabled_ = on && error_.empty();
}

bool Watch::enabled() const {
  std::lock_guard<std::mutex> lock(mu_);
  return enabled_;
}

void Watch::set_device_ops(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  device_ops_ = on;
}

void Watch::set_stub(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  stub_ = on;
}

std::vector<int64_t> Watch::take_touched() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> out;
  out.swap(touched_);
  return out;
}

std::vector<std::tuple<int64_t, std::string, std::vector<int64_t>>> Watch::take_meta() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::tuple<int64_t, std::string, std::vector<int64_t>>> out;
  for (int64_t slot : meta_dirty_) {
    const auto& m = meta_[slot];
    out.emplace_back(slot, dtype_name(m.first), m.second);
  }
  meta_dirty_.clear();
  return out;
}

bool Watch::take_recorded() {
  std::lock_guard<std::mutex> lock(mu_);
  const bool r = recorded_;
  recorded_ = false;
  return r;
}

std::string Watch::take_error() {
  std::lock_guard<std::mutex> lock(mu_);
  std::string e;
  e.swap(error_);
  return e;
}

std::pair<int64_t, int64_t> Watch::hook_time() const {
  return {hook_calls_.load(std::memory_order_relaxed), hook_ns_.load(std::memory_order_relaxed)};
}

std::pair<int64_t, int64_t> Watch::saved() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {reads_saved_, bytes_saved_};
}

namespace {

void watch_grad(const at::Tensor& t, int64_t id, int64_t slot) {
  auto w = find_watch(id);
  TORCH_CHECK(w != nullptr, "dnntrace: no gradient watch ", id);
  TORCH_CHECK(t.requires_grad(), "dnntrace: watch_grad needs a tensor that requires grad");
  w->watch(t, slot);
}

// The forward hook's native part (Watch::record), for callers that hold the watch's id.
void record_output(const at::Tensor& x, int64_t id, int64_t act_slot, int64_t grad_slot) {
  auto w = find_watch(id);
  TORCH_CHECK(w != nullptr, "dnntrace: no gradient watch ", id);
  w->record(x, act_slot, grad_slot);
}

at::Tensor watch_set_bank(int64_t id, const at::Tensor& counts, const at::Tensor& moments,
                          int64_t k, int64_t emin, int64_t octaves) {
  auto w = find_watch(id);
  TORCH_CHECK(w != nullptr, "dnntrace: no gradient watch ", id);
  return at::tensor(w->set_bank(counts, moments, k, emin, octaves), at::kLong);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(dnntrace, m) {
  // Registers a hook on t that adds its gradient into row `slot` of the watch's bank.
  m.def("watch_grad(Tensor t, int watch, int slot) -> ()");
  // x into row act_slot (read once per step) and its gradient into grad_slot; -1 skips either.
  m.def("record_output(Tensor x, int watch, int act_slot, int grad_slot) -> ()");
  // The bank (and layout) the watch's rows go to from now on; returns (int64, CPU) the rows
  // touched in the previous bank since the last drain, with its pending merges applied.
  m.def(
      "watch_set_bank(int watch, Tensor counts, Tensor moments, int k, int emin, int octaves) "
      "-> Tensor");
}

// Above autograd: the hook is registered on the caller's tensor itself.
TORCH_LIBRARY_IMPL(dnntrace, CompositeImplicitAutograd, m) {
  m.impl("watch_grad", TORCH_FN(watch_grad));
  m.impl("record_output", TORCH_FN(record_output));
  m.impl("watch_set_bank", TORCH_FN(watch_set_bank));
}

}  // namespace dnntrace::ops
