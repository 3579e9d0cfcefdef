// Runtime ISA dispatch for the CPU kernels (GCC function multi-versioning on x86-64 Linux).
//
// Functions marked ISDA_TARGET_CLONES are compiled three times: for x86-64-v4 (AVX-512), for
// x86-64-v3 (AVX2 + FMA) and for the baseline; the loader picks the best one the CPU supports.
// The build itself stays portable (no -march flags). Elsewhere the macro is empty.
// Note: the AVX2/AVX-512 clones contract a * b + c into FMAs, so float results may differ in the
// last bits between CPU generations (never between runs or thread counts on one machine).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define ISDA_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ISDA_TARGET_CLONES
#endif
