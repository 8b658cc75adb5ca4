// dnntrace._C.GradWatch: the Python handle of a native gradient watch (csrc/ops/grad_watch.h).
// Tensors reach the watch through its ops (dnntrace::watch_grad, dnntrace::watch_set_bank), and
// through `record` (the forward hook's per-output call) and `set_bank` (each flush): plain pybind11
// calls that unpack the tensors themselves (torch's Python C API), because a torch.ops call costs
// ~6 us in a training loop (argument parsing against the schema, the boxed dispatcher).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>

#include <memory>

#include "../ops/grad_watch.h"

namespace py = pybind11;
using dnntrace::ops::Watch;

namespace {

struct GradWatch {
  std::shared_ptr<Watch> watch = std::make_shared<Watch>();
  int64_t id = dnntrace::ops::register_watch(watch);
  ~GradWatch() { dnntrace::ops::unregister_watch(id); }
};

}  // namespace

void init_watch(py::module_& m) {
  py::class_<GradWatch>(m, "GradWatch",
                        "Activation gradients recorded by C++ hooks (see csrc/ops/grad_watch.h)")
      .def(py::init<>())
      .def_readonly("id", &GradWatch::id)
      // The forward hook's call: Watch::record(x, act_slot, grad_slot) without the GIL.
      .def(
          "record",
          [](GradWatch& g, py::handle x, int64_t act_slot, int64_t grad_slot) {
            if (!THPVariable_Check(x.ptr())) throw py::type_error("GradWatch.record: not a tensor");
            const at::Tensor& t = THPVariable_Unpack(x.ptr());
            py::gil_scoped_release nogil;
            g.watch->record(t, act_slot, grad_slot);
          },
          py::arg("x"), py::arg("act_slot"), py::arg("grad_slot"))
      // Watch::set_bank at each flush (the op dnntrace::watch_set_bank, without its dispatch):
      // the rows touched in the previous bank since the last drain, as a list.
      .def(
          "set_bank",
          [](GradWatch& g, py::handle counts, py::handle moments, int64_t k, int64_t emin,
             int64_t octaves) {
            if (!THPVariable_Check(counts.ptr()) || !THPVariable_Check(moments.ptr()))
              throw py::type_error("GradWatch.set_bank: counts and moments must be tensors");
            const at::Tensor& c = THPVariable_Unpack(counts.ptr());
            const at::Tensor& m = THPVariable_Unpack(moments.ptr());
            std::vector<int64_t> touched;
            {
              py::gil_scoped_release nogil;
              touched = g.watch->set_bank(c, m, k, emin, octaves);
            }
            return touched;
          },
          py::arg("counts"), py::arg("moments"), py::arg("k"), py::arg("emin"), py::arg("octaves"))
      .def("set_enabled", [](GradWatch& g, bool on) { g.watch->set_enabled(on); })
      .def("set_stub", [](GradWatch& g, bool on) { g.watch->set_stub(on); })
      .def("set_device_ops", [](GradWatch& g, bool on) { g.watch->set_device_ops(on); })
      .def("apply", [](GradWatch& g) { g.watch->apply(); })
      .def("end_step", [](GradWatch& g) { g.watch->end_step(); })
      .def("take_touched", [](GradWatch& g) { return g.watch->take_touched(); })
      .def("take_meta", [](GradWatch& g) { return g.watch->take_meta(); })
      .def("take_recorded", [](GradWatch& g) { return g.watch->take_recorded(); })
      .def("take_error", [](GradWatch& g) { return g.watch->take_error(); })
      .def("saved", [](GradWatch& g) { return g.watch->saved(); })
      .def("hook_time", [](GradWatch& g) { return g.watch->hook_time(); })
      // merges (end_step: and the table cleared), then (touched rows, changed rows' (slot, dtype,
      // shape), anything recorded, error or ""): one call per drain
      .def(
          "drain",
          [](GradWatch& g, bool end_step) {
            if (end_step) {
              g.watch->end_step();
            } else {
              g.watch->apply();
            }
            return py::make_tuple(g.watch->take_touched(), g.watch->take_meta(),
                                  g.watch->take_recorded(), g.watch->take_error());
          },
          py::arg("end_step") = false)
      .def("close", [](GradWatch& g) {
        g.watch->set_enabled(false);
        dnntrace::ops::unregister_watch(g.id);
      });
}
