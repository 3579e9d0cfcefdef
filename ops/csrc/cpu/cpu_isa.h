// Runtime ISA dispatch for the CPU kernels (function multi-versioning, x86-64 Linux).
//
// Functions marked ISDA_TARGET_CLONES are compiled once per entry of a clone set, and the loader
// picks the best one the CPU supports (an ifunc resolver). The build itself stays portable (no
// -march flags). Which set is used is decided by setup.py, which probes the C++ compiler that
// builds the extension (it compiles, links and loads a template function with each set, best
// first) and passes the winner as ISDA_CPU_CLONES:
//
//   2  "x86-64-v4", "x86-64-v3", default   micro-architecture levels: AVX-512 / AVX2 + FMA.
//                                          GCC 12+ (GCC 11 has no dispatcher for these levels).
//   1  "avx512f", "avx2", default          single ISA features: GCC 11. The avx2 clone has no FMA
//                                          (a target_clones entry names one feature on GCC 11).
//   0  none: one portable build.           Compilers without target_clones on function templates
//                                          (clang 14, for one), other CPUs and OSes, a failed
//                                          probe, ISDA_CPU_CLONES=none in setup.py's environment,
//                                          or a build system that does not define the macro.
//
// The clones are an optional speed-up, never a condition for building: results agree up to
// rounding. Note: clones with FMA contract a * b + c into FMAs, so float results may
// differ in the last bits between CPU generations and compilers (never between runs or thread
// counts of one build on one machine).
#pragma once

#ifndef ISDA_CPU_CLONES
#define ISDA_CPU_CLONES 0
#endif

#if defined(__x86_64__) && defined(__linux__) && ISDA_CPU_CLONES == 2
#define ISDA_TARGET_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__linux__) && ISDA_CPU_CLONES == 1
#define ISDA_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ISDA_TARGET_CLONES
#endif
