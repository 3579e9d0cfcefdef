#!/usr/bin/env bash
# Build ISDA's op (CPU sources) with every supported C++ compiler found on the machine, the way
# users build it (CC=gcc-11 CXX=g++-11 python setup.py build_ext), each into its own folder
# build_compiler_check/<compiler>/, then load each built module in a fresh Python and run it
# against independent references (tools/setup/check_built_op.py).
# Compilers: g++-11 (Ubuntu 22.04's default), g++-12 (else the default g++), clang++; override the
# list with ISDA_COMPILERS="g++-11 clang++-18 ...". A compiler that is not installed is skipped
# (exit 0) unless ISDA_REQUIRE_COMPILERS lists it, e.g. ISDA_REQUIRE_COMPILERS="g++-11 clang++".
# Cached per compiler by a hash of the sources, the compiler's version and torch's: an unchanged
# re-run is instant.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${ISDA_VENV:-$(pwd)/.venv}/bin/python
OUT=build_compiler_check
COMPILERS=${ISDA_COMPILERS:-g++-11 g++-12 clang++}
REQUIRED=" ${ISDA_REQUIRE_COMPILERS:-} "
export MAX_JOBS=${MAX_JOBS:-2}
say() { printf '[compiler-check] %s\n' "$*"; }

# The C compiler paired with a C++ one (setuptools reads CC, nvcc's -ccbin comes from it).
c_compiler_of() {
  case "$1" in
    *clang++*) echo "${1/clang++/clang}" ;;
    *g++*) echo "${1/g++/gcc}" ;;
    *) echo "$1" ;;
  esac
}

sources_hash=$( { find ops setup.py tools/setup/check_built_op.py isda/layers/ms_deform_attn.py \
                  -type f -print0 | sort -z | xargs -0 cat;
                  "$PY" -c "import sys, torch; print(torch.__version__, sys.version)"; } \
                | sha256sum | cut -c1-16)

# check_one <label> <CC> <CXX>: build into $OUT/<CXX>, check the clones, run the op; 0 when OK.
check_one() {
  local label=$1 cc=$2 cxx=$3
  local dir=$OUT/$cxx key t0 secs clones so resolvers has_clones has_resolvers
  key=$( { echo "$sources_hash"; "$cxx" --version; "$cc" --version; } 2>&1 | sha256sum | cut -c1-16)
  if [ "$(cat "$dir/.stamp" 2>/dev/null)" = "$key" ]; then
    say "$label: OK (clones: $(cat "$dir/.clones")) (cached: unchanged since the last check)"
    return 0
  fi
  mkdir -p "$dir"   # kept between runs: ninja rebuilds only what changed
  rm -f "$dir/.stamp"
  t0=$(date +%s)
  # CPU only: FORCE_CUDA=0 and no GPU visible to torch (a GPU machine would build the .cu too).
  if ! CC=$cc CXX=$cxx FORCE_CUDA=0 CUDA_VISIBLE_DEVICES="" "$PY" setup.py build_ext \
       --build-temp "$dir/temp" --build-lib "$dir/lib" > "$dir/build.log" 2>&1; then
    tail -n 40 "$dir/build.log"
    if grep -q "'omp.h' file not found" "$dir/build.log"; then
      say "$label: $cxx has no OpenMP headers: install them (clang: apt-get install libomp-dev)"
    fi
    say "$label: FAILED: the build (log: $dir/build.log)"; return 1
  fi
  secs=$(( $(date +%s) - t0 ))
  # setup.py's line "isda: CPU kernel clones: <set> (<why>) [compiler: ...]": keep <set>
  clones=$(sed -n 's/^isda: CPU kernel clones: \([^ ]*\).*$/\1/p' "$dir/build.log" | tail -n 1)
  so=$(find "$dir/lib" -name '_C*.so' | head -n 1)
  if [ -z "$so" ] || [ -z "$clones" ]; then
    tail -n 20 "$dir/build.log"
    say "$label: FAILED: no built module or no clone-set line in $dir/build.log"; return 1
  fi
  # The clone set named at build time must be the one compiled in: ifunc resolvers iff clones.
  if command -v nm >/dev/null 2>&1; then
    resolvers=$(nm "$so" | grep -c '\.resolver$' || true)
    has_clones=yes; [ "$clones" = none ] && has_clones=no
    has_resolvers=yes; [ "$resolvers" = 0 ] && has_resolvers=no
    if [ "$has_clones" != "$has_resolvers" ]; then
      say "$label: FAILED: clone set '$clones' chosen, $resolvers ifunc resolvers in $so"; return 1
    fi
  fi
  if ! "$PY" tools/setup/check_built_op.py "$so" > "$dir/check.log" 2>&1; then
    tail -n 30 "$dir/check.log"
    say "$label: FAILED: the op does not match the references (log: $dir/check.log)"; return 1
  fi
  echo "$clones" > "$dir/.clones"
  echo "$key" > "$dir/.stamp"
  say "$label: OK (clones: $clones) built in $secs s, op checked against the references"
}

failed=0
seen=" "
for cxx in $COMPILERS; do
  label=$cxx
  if [ "$cxx" = g++-12 ] && ! command -v g++-12 >/dev/null 2>&1 && command -v g++ >/dev/null \
     && [[ "$REQUIRED" != *" g++-12 "* ]]; then
    cxx=g++; label="g++ (default, $(g++ -dumpfullversion -dumpversion 2>/dev/null || echo '?'))"
  fi
  if ! command -v "$cxx" >/dev/null 2>&1; then
    case "$REQUIRED" in
      *" $cxx "*) say "$label: FAILED: not installed (ISDA_REQUIRE_COMPILERS lists it)"; failed=1 ;;
      *) say "$label: skipped: not installed" ;;
    esac
    continue
  fi
  real=$(readlink -f "$(command -v "$cxx")")
  case "$seen" in *" $real "*) say "$label: skipped: the same compiler as above"; continue;; esac
  seen="$seen$real "
  cc=$(c_compiler_of "$cxx")
  command -v "$cc" >/dev/null 2>&1 || cc=$cxx
  check_one "$label" "$cc" "$cxx" || failed=1
done
exit $failed
