#!/usr/bin/env bash
# `make gpu-check`: ISDA's GPU checks (docs/gpu.md). Prints the GPUs and torch's CUDA set-up,
# builds isda._C with its CUDA kernels when the installed one lacks them, runs
# `pytest -m gpu tests/ops/test_gpu.py` and ends with one line:
#   gpu-check: N passed, N failed, N skipped
# Without a usable GPU the tests skip ("needs a CUDA GPU"), the reason is printed, exit 0.
# About a minute on one GPU plus, the first time, a few minutes for the CUDA build.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${ISDA_VENV:-$(pwd)/.venv}/bin/python
say() { printf '[gpu-check] %s\n' "$*"; }
t0=$(date +%s)

if command -v nvidia-smi >/dev/null 2>&1; then
  say "nvidia-smi -L:"; nvidia-smi -L || say "nvidia-smi failed (no driver loaded?)"
else
  say "nvidia-smi: not found (no NVIDIA driver on this machine)"
fi
"$PY" - <<'PYEOF'
import torch
print(f"[gpu-check] torch {torch.__version__}, built with CUDA {torch.version.cuda or 'no (CPU-only build)'}; "
      f"torch.cuda.is_available() = {torch.cuda.is_available()}, {torch.cuda.device_count()} device(s)")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"[gpu-check]   cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, "
          f"{p.total_memory / 2 ** 30:.1f} GiB")
PYEOF
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

build_failed=0
if [ "$cuda" = 1 ]; then
  has=$("$PY" -c "from isda import _C; print(int(_C.has_cuda()))" 2>/dev/null || echo 0)
  if [ "$has" = 1 ]; then
    say "isda._C has its CUDA kernels"
  else
    # TORCH_CUDA_ARCH_LIST unset: torch builds for the GPUs it sees
    say "isda._C lacks CUDA kernels: building ISDA with FORCE_CUDA=1 (a few minutes)"
    mkdir -p build_cuda_check
    if FORCE_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e . \
         > build_cuda_check/gpu_check_build.log 2>&1 \
       && [ "$("$PY" -c "from isda import _C; print(int(_C.has_cuda()))" 2>/dev/null)" = 1 ]; then
      say "built isda._C with CUDA kernels in $(( $(date +%s) - t0 )) s"
    else
      tail -n 40 build_cuda_check/gpu_check_build.log
      say "FAILED: the CUDA build of isda._C (log: build_cuda_check/gpu_check_build.log);" \
          "the op tests will fail. Is nvcc installed (CUDA_HOME)? See docs/troubleshooting.md"
      build_failed=1
    fi
  fi
else
  say "no usable CUDA GPU (torch.cuda.is_available() is False): the CUDA tests skip" \
      "with reason 'needs a CUDA GPU'; only the GPU-free checks of tests/ops/test_gpu.py run"
fi

xml=$(mktemp -t isda_gpu_check.XXXXXX.xml)
trap 'rm -f "$xml"' EXIT
# a stuck NCCL rendezvous or kernel must not hang the check forever
timeout "${ISDA_GPU_CHECK_TIMEOUT:-900}" "$PY" -m pytest -m gpu tests/ops/test_gpu.py \
  --junitxml="$xml" "$@"
rc=$?
[ "$rc" = 124 ] && say "pytest timed out after ${ISDA_GPU_CHECK_TIMEOUT:-900} s"
say "finished in $(( $(date +%s) - t0 )) s"
summary=$("$PY" - "$xml" "$rc" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (ET.ParseError, OSError):
    print(f"gpu-check: 0 passed, 0 failed, 0 skipped (no pytest report, exit code {sys.argv[2]})")
    sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
failed = n["failures"] + n["errors"]
print(f"gpu-check: {n['tests'] - failed - n['skipped']} passed, {failed} failed, "
      f"{n['skipped']} skipped")
PYEOF
)
echo "$summary"
case "$summary" in *" 0 failed,"*) ;; *) exit 1;; esac
[ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"   # 5: nothing collected
[ "$build_failed" = 0 ] || exit 1
exit 0
