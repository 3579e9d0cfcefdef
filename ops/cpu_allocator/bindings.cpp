// Python bindings of the large-block caching CPU allocator (module isda._cpu_cache): an optional
// extension of its own, like the compiled dropout, so that it can never stop the op from building.
// Plain pybind11 (no tensors cross this boundary): torch/extension.h would triple the compile time.
#include <pybind11/pybind11.h>

#include "block_cache.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &isda::install_block_cache,
        "Make the large-block cache torch's CPU allocator (later calls change the limits)",
        py::arg("min_bytes"), py::arg("cache_limit"), py::arg("huge_pages") = false);
  m.def("installed", &isda::block_cache_installed);
  m.def("class_size", &isda::block_class_size, py::arg("n"));
  m.def("release", &isda::release_cached_blocks, "Unmap every idle cached block; bytes released");
  m.def("stats", []() {
    auto s = isda::block_cache_stats();
    py::dict d;
    d["in_use_bytes"] = s.in_use_bytes;
    d["cached_bytes"] = s.cached_bytes;
    d["peak_in_use_bytes"] = s.peak_in_use_bytes;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["released"] = s.released;
    d["repurposed"] = s.repurposed;
    d["min_bytes"] = s.min_bytes;
    d["cache_limit"] = s.cache_limit;
    d["huge_pages"] = s.huge_pages;
    return d;
  });
}
