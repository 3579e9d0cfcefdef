#!/usr/bin/env python
"""Install ISDA and build its compiled multi-scale deformable attention op (``isda._C``).

    pip install --no-build-isolation -e .        # CPU op (plus CUDA when a GPU toolkit is usable)
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install --no-build-isolation -e .

``--no-build-isolation`` matters: the build needs the torch that is already installed.
CUDA sources are compiled when torch sees a GPU and CUDA_HOME is set, or when FORCE_CUDA=1.
The C++ compiler is torch's choice, $CXX else ``c++``: ``CC=gcc-11 CXX=g++-11 pip install ...``
(CC is also nvcc's host compiler). ISDA_CPU_CLONES=auto|none|x86-64-v|avx512f picks the CPU
kernels' clone set (see probe_cpu_clones). Builds carry no debug information (Python's default
``-g`` more than doubles the compile time of torch's headers): ISDA_DEBUG_BUILD=1 keeps it.
ISDA_BUILD_ONLY=isda._C (comma-separated names) builds only those extensions.
"""
import glob
import os
import platform
import shlex
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit("ISDA's setup.py needs PyTorch installed first; use `pip install --no-build-isolation`.")

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("ops", "csrc")  # the deformable attention op: isda._C (torch.ops.isda.*)


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if CUDA_HOME is None:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit found: set CUDA_HOME (e.g. /usr/local/cuda).")
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def extra_cuda_includes():
    """CUDA headers that some toolkits lack but the pip-installed NVIDIA wheels carry
    (e.g. cusparse.h, pulled in by ATen/cuda/CUDAContext.h)."""
    dirs = []
    for site in sys.path:
        for sub in ("cu13", "cu12", "cusparse", "cublas", "cuda_runtime"):
            d = os.path.join(site, "nvidia", sub, "include")
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


# CPU kernel clone sets (ops/csrc/cpu/cpu_isa.h), best first: (ISDA_CPU_CLONES value, name).
CLONE_SETS = [(2, "x86-64-v4/x86-64-v3/default"), (1, "avx512f/avx2/default")]
CLONE_ALIASES = {"x86-64-v": 2, "x86-64-v4": 2, "2": 2, "avx512f": 1, "1": 1}

# A template (as the kernels are: GCC 11 and clang fail on those, not on plain functions) in an
# anonymous namespace, instantiated for float and double, whose result is checked when loaded.
PROBE_SOURCE = r"""
#include "cpu/cpu_isa.h"
namespace {
template <typename T>
ISDA_TARGET_CLONES T probe_axpy_sum(T* __restrict__ out, T w, const T* __restrict__ v, long n) {
  T s = 0;
  for (long i = 0; i < n; ++i) {
    out[i] += w * v[i];
    s += out[i];
  }
  return s;
}
}  // namespace
extern "C" int isda_clones_probe(void) {
  float f[64], g[64];
  double d[64], e[64];
  for (int i = 0; i < 64; ++i) { f[i] = 1.0f; g[i] = float(i); d[i] = 2.0; e[i] = double(i); }
  const float fs = probe_axpy_sum<float>(f, 2.0f, g, 64);   // 64 + 2 * 2016
  const double ds = probe_axpy_sum<double>(d, 0.5, e, 64);  // 128 + 0.5 * 2016
  return fs == 4096.0f && ds == 1136.0 ? 1 : 0;
}
"""
PROBE_LOAD = ("import ctypes, sys; "
              "sys.exit(0 if ctypes.CDLL(sys.argv[1]).isda_clones_probe() == 1 else 1)")


def probe_cpu_clones():
    """(ISDA_CPU_CLONES value, name) for the compiler that will build the extension.

    Each candidate set is tried, best first, by compiling and linking a small shared object with
    the compiler torch's BuildExtension uses ($CXX, else ``c++``) and loading it in a fresh Python
    (the ifunc resolver runs then). The first that works wins; anything going wrong (compiler
    error, missing compiler, timeout, load failure) means "try the next", and in the end a
    portable build (0): the clones are a speed-up and must never stop the op from building.
    ISDA_CPU_CLONES=none forces the portable build, =x86-64-v or =avx512f restricts the probe to
    that set.
    """
    want = os.environ.get("ISDA_CPU_CLONES", "auto").strip().lower() or "auto"
    if want in ("none", "0", "off", "portable"):
        return 0, "none (ISDA_CPU_CLONES=none)"
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        return 0, f"none ({sys.platform}/{platform.machine()}: x86-64 Linux only)"
    candidates = CLONE_SETS
    if want != "auto":
        if want not in CLONE_ALIASES:
            print(f"isda: ignoring ISDA_CPU_CLONES={want!r} (auto|none|x86-64-v|avx512f)")
        else:
            candidates = [c for c in CLONE_SETS if c[0] == CLONE_ALIASES[want]]
    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    try:
        with tempfile.TemporaryDirectory(prefix="isda_clones_") as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write(PROBE_SOURCE)
            include = os.path.join(HERE, CSRC)
            for level, name in candidates:
                so = os.path.join(tmp, f"probe{level}.so")
                build = cxx + ["-std=c++20", "-O3", "-fPIC", "-shared", "-I", include,
                               f"-DISDA_CPU_CLONES={level}", src, "-o", so]
                load = [sys.executable, "-c", PROBE_LOAD, so]
                try:
                    ok = subprocess.run(build, capture_output=True, timeout=60).returncode == 0
                    if ok and subprocess.run(load, capture_output=True, timeout=60).returncode == 0:
                        return level, name
                except (OSError, subprocess.SubprocessError):
                    continue
    except OSError:
        pass
    tried = ", ".join(n for _, n in candidates)
    return 0, f"none (portable build: {' '.join(cxx)} builds none of {tried})"


def openmp_missing() -> bool:
    """Whether $CXX fails to compile an OpenMP program. torch's headers include <omp.h>, so the
    build will fail; said up front with the fix (clang needs the LLVM OpenMP headers)."""
    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    try:
        with tempfile.TemporaryDirectory(prefix="isda_omp_") as tmp:
            src = os.path.join(tmp, "omp.cpp")
            with open(src, "w") as f:
                f.write("#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n")
            cmd = cxx + ["-fopenmp", "-fsyntax-only", src]
            return subprocess.run(cmd, capture_output=True, timeout=60).returncode != 0
    except (OSError, subprocess.SubprocessError):
        return False  # cannot tell: let the build speak


def get_extensions():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3", "-fno-math-errno", "-DISDA_EXT_VERSION=1"]
    if os.environ.get("ISDA_DEBUG_BUILD", "0") != "1" and sys.platform != "win32":
        cxx_flags.append("-g0")  # after Python's -g in the command line: it wins
    link_flags = []
    # at::parallel_for is header-inlined: the extension itself must be compiled with OpenMP (with
    # GCC the runtime is the libgomp torch already loads; clang links LLVM's libomp). No -march
    # flags: wheels must stay portable (the CPU kernels' clones dispatch at load time instead).
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
        level, name = probe_cpu_clones()
        cxx_flags.append(f"-DISDA_CPU_CLONES={level}")
        print(f"isda: CPU kernel clones: {name} [compiler: {os.environ.get('CXX', 'c++')}]",
              flush=True)
        if openmp_missing():
            print(f"isda: WARNING: {os.environ.get('CXX', 'c++')} cannot compile OpenMP code "
                  "(#include <omp.h> with -fopenmp), which torch's headers need: install the "
                  "compiler's OpenMP headers (clang: libomp-dev) or use g++", flush=True)
    elif sys.platform == "win32":
        cxx_flags = ["/O2", "/openmp", "/DISDA_EXT_VERSION=1"]
    include_dirs = [os.path.join(HERE, CSRC)]
    if want_cuda():
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-DCUDA_HAS_FP16=1",
                      "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_HALF2_OPERATORS__"]
        op = CUDAExtension(
            "isda._C", cpp_sources + cuda_sources,
            include_dirs=include_dirs + extra_cuda_includes(),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        op = CppExtension("isda._C", cpp_sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    extensions = [op]
    only = [n.strip() for n in os.environ.get("ISDA_BUILD_ONLY", "").split(",") if n.strip()]
    if only:
        unknown = sorted(set(only) - {e.name for e in extensions})
        if unknown:
            sys.exit(f"ISDA_BUILD_ONLY names no extension {unknown}: "
                     f"choose from {[e.name for e in extensions]}")
        extensions = [e for e in extensions if e.name in only]
    return extensions


if __name__ == "__main__":
    setup(
        name="isda",
        version="0.1.0",
        description="ISDA: position-aware instance segmentation with deformable attention "
                    "(Detectron2)",
        license="Apache-2.0",
        python_requires=">=3.9",
        packages=find_packages(include=["isda", "isda.*"]),
        ext_modules=get_extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        zip_safe=False,
    )
