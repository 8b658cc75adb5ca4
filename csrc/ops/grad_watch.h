// The tracer's activations and activation gradients, recorded natively: the forward hook calls
// dnntrace::record_output(x, watch, act_slot, grad_slot), which adds x into its row and registers
// a C++ hook on x; autograd runs the hook with x's gradient (on whichever thread runs that part of
// the backward, without Python) and it adds the gradient into row `grad_slot` of the bank the
// tracer holds at that moment.
//
// A Watch keeps what the tracer needs per tensor: each tensor read once per step (a tensor that
// is the same data as one already read this step becomes a row merge, see capture/readonce.py),
// the rows touched, each row's dtype and shape, and errors, which disable the watch and are
// reported by the tracer at the step's end (a hook must never throw into a user's forward or
// backward). All state is guarded by one mutex; no Python object is touched.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/UndefinedTensorImpl.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace dnntrace::ops {

class Watch : public std::enable_shared_from_this<Watch> {
 public:
  // The bank rows go to from now on (the tracer's current one) and its layout. Atomically with
  // the switch, the previous bank gets its pending merges, and the rows touched in it since the
  // last drain are returned (they belong to that bank's step).
  std::vector<int64_t> set_bank(const at::Tensor& counts, const at::Tensor& moments, int64_t k,
                                int64_t emin, int64_t octaves);
  // Registers the hook on t (which requires grad); its gradient goes to `slot`.
  void watch(const at::Tensor& t, int64_t slot);
  // Adds x into `slot` (what the hook does), read once per step.
  void accumulate(const at::Tensor& x, int64_t slot);
  // The forward hook's native part: x into `act_slot` (read once per step) and a hook for its
  // gradient into `grad_slot`; -1 skips either, and so does a tensor on another device than the
  // bank's (model parallel) or a disabled watch.
  void record(const at::Tensor& x, int64_t act_slot, int64_t grad_slot);

  void set_enabled(bool on);
  bool enabled() const;
  void set_stub(bool on);  // benchmarks: everything but the statistics op
  // Tests: merges on a CPU bank by the ATen ops a CUDA bank runs, to check them against the
  // native pass without a GPU.
  void set_device_ops(bool on);
  // Runs the pending row merges (device ops on a CUDA bank, no sync).
  void apply();
  // The step's end: merges run, the read-once table cleared.
  void end_step();

  // Drained by the tracer at each flush.
  std::vector<int64_t> take_touched();
  // (slot, dtype name, shape) of rows whose tensor's dtype or shape changed.
  std::vector<std::tuple<int64_t, std::string, std::vector<int64_t>>> take_meta();
  bool take_recorded();
  std::string take_error();
  std::pair<int64_t, int64_t> saved() const;  // (reads, bytes) merged instead of read
  // (calls, nanoseconds) of the gradient hooks so far: their wall time in the backward, the
  // statistics op included (benchmarks: what the hooks cost in place)
  std::pair<int64_t, int64_t> hook_time() const;

 private:
  // A tensor's identity for read-once (storage address, dtype, version, sizes then strides),
  // hashed: one lookup per record, no heap allocation for up to 5 dimensions.
  struct Key {
    intptr_t data;
    int8_t dtype;
    int64_t version;
    c10::SmallVector<int64_t, 10> dims;
    bool operator==(const Key& o) const {
      return data == o.data && dtype == o.dtype && version == o.version && dims == o.dims;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      // The address and version tell tensors apart; views of one address differ in dims,
      // compared on a hit.
      return std::hash<intptr_t>()(k.data) ^
             (std::hash<int64_t>()(k.version) * 0x9e3779b97f4a7c15ull) ^
             static_cast<size_t>(k.dims.size());
    }
  };
  struct Seen {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>
        impl;  // alive: its memory was not reused
    int64_t slot;
  };

  void accumulate_locked(const at::Tensor& x, int64_t slot);
  // accumulate_locked; an error disables the watch (a hook never throws)
  void accumulate_or_fail_locked(const at::Tensor& x, int64_t slot);
  void read_locked(const at::Tensor& x, int64_t slot);
  void apply_locked();
  // apply_locked, an error disabling the watch; nothing stays queued either way
  void merge_pending_locked();
  void fail_locked(const char* what);

  mutable std::mutex mu_;
  at::Tensor counts_, moments_;
  int64_t k_ = 6, emin_ = -48, octaves_ = 64;
  bool enabled_ = true, stub_ = false, recorded_ = false, device_ops_ = false;
  std::string error_;
  std::vector<int64_t> touched_;
  // By slot (a bank row), grown on demand: dtype (-1: none yet) and shape last seen, reads this
  // step, and whether the row is the source of a pending merge.
  std::vector<std::pair<int8_t, std::vector<int64_t>>> meta_;
  std::vector<int64_t> meta_dirty_;
  std::unordered_map<Key, Seen, KeyHash> seen_;
  std::vector<int64_t> adds_;
  std::vector<std::pair<int64_t, int64_t>> pending_;
  std::vector<uint8_t> is_source_;
  int64_t reads_saved_ = 0, bytes_saved_ = 0;
  std::atomic<int64_t> hook_calls_{0}, hook_ns_{0};  // outside mu_: a hook adds after unlocking
};

// Watches by id: the op dnntrace::watch_grad names its watch by an int.
int64_t register_watch(std::shared_ptr<Watch> w);
void unregister_watch(int64_t id);
std::shared_ptr<Watch> find_watch(int64_t id);

}  // namespace dnntrace::ops
