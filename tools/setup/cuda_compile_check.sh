#!/usr/bin/env bash
# Compile ISDA's op (isda._C alone) with its CUDA kernels (FORCE_CUDA=1) into a separate build
# folder, so a CPU-only machine still proves the .cu sources build for the GPUs users have.
# Twice when g++-11 is installed: with the default host compiler (build_cuda_check/), and with
# CC=gcc-11 CXX=g++-11 (build_cuda_check/g++-11/: Ubuntu 22.04's compiler, which torch's
# BuildExtension then also passes to nvcc as -ccbin). ISDA_CUDA_HOST_COMPILERS="default g++-11"
# sets the list ("default" = $CXX or c++); a listed compiler that is missing is skipped.
# Cached per build by a hash of the sources, the compiler settings and torch: an unchanged re-run
# is instant. With no CUDA toolkit on the machine the check is skipped with a message (exit 0),
# unless ISDA_REQUIRE_CUDA_CHECK=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${ISDA_VENV:-$(pwd)/.venv}/bin/python
OUT=build_cuda_check
HOSTS=${ISDA_CUDA_HOST_COMPILERS:-default g++-11}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export FORCE_CUDA=1
say() { printf '[cuda-check] %s\n' "$*"; }

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  if [ "${ISDA_REQUIRE_CUDA_CHECK:-0}" = 1 ]; then say "no nvcc under CUDA_HOME=$CUDA_HOME"; exit 1; fi
  say "SKIPPED: no CUDA toolkit (nvcc) under CUDA_HOME=$CUDA_HOME"; exit 0
fi
# Which GPU architectures a binary carries: cuobjdump from the toolkit, the PATH, or the copy
# that torch's triton dependency ships; without any, the architecture check is skipped (said so).
cuobjdump=""
for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
         "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then cuobjdump=$c; break; fi
done
common_key=$( { find ops setup.py -type f -print0 | sort -z | xargs -0 cat;
                echo "$TORCH_CUDA_ARCH_LIST"; "$CUDA_HOME/bin/nvcc" --version;
                "$PY" -c "import torch; print(torch.__version__)"; } | sha256sum | cut -c1-16)

# cuda_build <label> <folder> [<CC> <CXX>]: compile, load, check the architectures; 0 when OK.
cuda_build() {
  local label=$1 out=$2 cc=${3:-} cxx=${4:-}
  local key
  key=$( { echo "$common_key $cc $cxx"; "${cxx:-${CXX:-c++}}" --version; } 2>&1 | sha256sum | cut -c1-16)
  if [ "$(cat "$out/.stamp" 2>/dev/null)" = "$key" ]; then
    say "$label: OK (cached: sources unchanged since the last successful compile, key $key)"; return 0
  fi
  say "$label: compiling CPU+CUDA sources for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (several minutes)"
  local t0 so archs want sm
  t0=$(date +%s)
  mkdir -p "$out"   # kept between runs: ninja rebuilds only what changed
  local -a env_cc=()
  if [ -n "$cxx" ]; then env_cc=(CC="$cc" CXX="$cxx"); fi
  if ! env ${env_cc[@]+"${env_cc[@]}"} ISDA_BUILD_ONLY=isda._C MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext \
       --build-temp "$out/temp" --build-lib "$out/lib" > "$out/build.log" 2>&1; then
    tail -n 60 "$out/build.log"; say "$label: FAILED: CUDA compile (full log: $out/build.log)"; return 1
  fi
  if [ -n "$cc" ] && ! grep -q -- "-ccbin $cc" "$out/build.log" "$out/temp/build.ninja" 2>/dev/null; then
    say "$label: FAILED: nvcc was not given -ccbin $cc (see $out/temp/build.ninja)"; return 1
  fi
  so=$(find "$out/lib" -name '_C*.so' | head -n 1)
  # The built module must load on this CPU machine and report its CUDA kernels.
  "$PY" - "$so" <<'PYEOF' || { say "$label: FAILED: $so does not load or has no CUDA kernels"; return 1; }
import importlib.util, sys
import torch  # noqa: F401  (loads libc10 & co. that the extension links against)
spec = importlib.util.spec_from_file_location("isda._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.has_cuda(), "the FORCE_CUDA build does not report CUDA kernels"
PYEOF
  if [ -n "$cuobjdump" ]; then
    archs=$("$cuobjdump" --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ' || true)
    for want in $(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' '); do
      sm="sm_${want//./}"; sm=${sm%+PTX}
      case " $archs " in *" $sm "*) ;; *) say "$label: FAILED: no $sm code in $so (found: ${archs:-none})"; return 1;; esac
    done
  else
    archs="(architectures not listed: no cuobjdump found)"
  fi
  echo "$key" > "$out/.stamp"
  say "$label: OK: built for $archs in $(( $(date +%s) - t0 )) s ($so)"
}

failed=0
for host in $HOSTS; do
  if [ "$host" = default ]; then
    cuda_build "host ${CXX:-c++}" "$OUT" || failed=1
  elif command -v "$host" >/dev/null 2>&1; then
    cc=${host/g++/gcc}; cc=${cc/clang++/clang}
    command -v "$cc" >/dev/null 2>&1 || cc=$host
    cuda_build "host $host (-ccbin $cc)" "$OUT/$host" "$cc" "$host" || failed=1
  else
    say "host $host: skipped: not installed"
  fi
done
exit $failed
