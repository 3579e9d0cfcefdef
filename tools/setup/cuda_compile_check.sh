#!/usr/bin/env bash
# Compile ISDA's op with its CUDA kernels (FORCE_CUDA=1) into a separate build folder, so a
# CPU-only machine still proves the .cu sources build for the GPUs users have.
# Cached by a hash of the sources, the compiler settings and torch: an unchanged re-run is instant.
# With no CUDA toolkit on the machine the check is skipped with a message (exit 0), unless
# ISDA_REQUIRE_CUDA_CHECK=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${ISDA_VENV:-$(pwd)/.venv}/bin/python
OUT=build_cuda_check
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export FORCE_CUDA=1
say() { printf '[cuda-check] %s\n' "$*"; }

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  if [ "${ISDA_REQUIRE_CUDA_CHECK:-0}" = 1 ]; then say "no nvcc under CUDA_HOME=$CUDA_HOME"; exit 1; fi
  say "SKIPPED: no CUDA toolkit (nvcc) under CUDA_HOME=$CUDA_HOME"; exit 0
fi
key=$( { find ops setup.py -type f -print0 | sort -z | xargs -0 cat;
         echo "$TORCH_CUDA_ARCH_LIST"; "$CUDA_HOME/bin/nvcc" --version;
         "$PY" -c "import torch; print(torch.__version__)"; } | sha256sum | cut -c1-16)
if [ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$key" ]; then
  say "OK (cached: sources unchanged since the last successful compile, key $key)"; exit 0
fi
say "compiling CPU+CUDA sources for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (several minutes)"
t0=$(date +%s)
mkdir -p "$OUT"   # kept between runs: ninja rebuilds only what changed
if ! MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py -q build_ext --build-temp "$OUT/temp" --build-lib "$OUT/lib" \
     > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"; say "FAILED: CUDA compile (full log: $OUT/build.log)"; exit 1
fi
so=$(find "$OUT/lib" -name '_C*.so' | head -n 1)
# The built module must load on this CPU machine and report its CUDA kernels.
"$PY" - "$so" <<'PYEOF'
import importlib.util, sys
import torch  # noqa: F401  (loads libc10 & co. that the extension links against)
spec = importlib.util.spec_from_file_location("isda._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.has_cuda(), "the FORCE_CUDA build does not report CUDA kernels"
PYEOF
# Which GPU architectures the binary carries: cuobjdump from the toolkit, the PATH, or the copy
# that torch's triton dependency ships; without any, the architecture check is skipped (said so).
cuobjdump=""
for c in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" \
         "$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then cuobjdump=$c; break; fi
done
if [ -n "$cuobjdump" ]; then
  archs=$("$cuobjdump" --list-elf "$so" 2>/dev/null | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ' || true)
  for want in $(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' ' '); do
    sm="sm_${want//./}"; sm=${sm%+PTX}
    case " $archs " in *" $sm "*) ;; *) say "FAILED: no $sm code in $so (found: ${archs:-none})"; exit 1;; esac
  done
else
  archs="(architectures not listed: no cuobjdump found)"
fi
echo "$key" > "$OUT/.stamp"
say "OK: built for $archs in $(( $(date +%s) - t0 )) s ($so)"
