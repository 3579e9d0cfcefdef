// Python bindings of the compiled CPU dropout (module isda._dropout): an optional speed-up,
// built as its own extension so that it can never stop the deformable attention op from building.
// torch/python.h (pybind11 with the tensor casters) and ATen, not torch/extension.h: the C++
// frontend that the latter adds is unused here and doubles the compile time.
#include <ATen/ATen.h>
#include <torch/python.h>

#include "dropout.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dropout_forward", &isda::dropout_forward_cpu,
        "CPU dropout (optionally fused with a preceding ReLU) with a counter-based stream: "
        "(input, p, seed, relu) -> [output, uint8 mask]",
        py::arg("input"), py::arg("p"), py::arg("seed"), py::arg("relu") = false);
  m.def("dropout_forward_", &isda::dropout_forward_inplace_cpu,
        "dropout_forward writing the output into the (contiguous) input: (input, p, seed, relu) "
        "-> uint8 mask",
        py::arg("input"), py::arg("p"), py::arg("seed"), py::arg("relu") = false);
  m.def("dropout_mask", &isda::dropout_mask_cpu,
        "the uint8 mask of dropout_forward alone: (input, p, seed, relu) -> mask",
        py::arg("input"), py::arg("p"), py::arg("seed"), py::arg("relu") = false);
  m.def("dropout_backward", &isda::dropout_backward_cpu,
        "grad_output * mask * scale", py::arg("grad_output"), py::arg("mask"), py::arg("scale"));
  m.def("dropout_backward_", &isda::dropout_backward_inplace_cpu,
        "grad *= mask * scale, in place (grad contiguous)", py::arg("grad"), py::arg("mask"),
        py::arg("scale"));
}
