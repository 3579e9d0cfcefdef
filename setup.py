#!/usr/bin/env python
"""Install ISDA and build its compiled multi-scale deformable attention op (``isda._C``).

    pip install --no-build-isolation -e .        # CPU op (plus CUDA when a GPU toolkit is usable)
    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" pip install --no-build-isolation -e .

``--no-build-isolation`` matters: the build needs the torch that is already installed.
CUDA sources are compiled when torch sees a GPU and CUDA_HOME is set, or when FORCE_CUDA=1.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit("ISDA's setup.py needs PyTorch installed first; use `pip install --no-build-isolation`.")

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("ops", "csrc")


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


def get_extensions():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3", "-fno-math-errno", "-DISDA_EXT_VERSION=1"]
    link_flags = []
    # at::parallel_for is header-inlined: the extension itself must be compiled with OpenMP (the
    # runtime is the libgomp that torch already loads). No -march flags: wheels must stay portable.
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    elif sys.platform == "win32":
        cxx_flags = ["/O2", "/openmp", "/DISDA_EXT_VERSION=1"]
    include_dirs = [os.path.join(HERE, CSRC)]
    if want_cuda():
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-DCUDA_HAS_FP16=1",
                      "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_HALF2_OPERATORS__"]
        return [CUDAExtension(
            "isda._C", cpp_sources + cuda_sources,
            include_dirs=include_dirs + extra_cuda_includes(),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )]
    return [CppExtension("isda._C", cpp_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]


setup(
    name="isda",
    version="0.1.0",
    description="ISDA: position-aware instance segmentation with deformable attention (Detectron2)",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["isda", "isda.*"]),
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
