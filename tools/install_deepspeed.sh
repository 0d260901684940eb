#!/usr/bin/env bash
# Install DeepSpeed into a venv with its NVMe-offload ops (async_io, pin_memory) compiled in.
#
# Why: DeepSpeed compiles those ops on first use (~3 minutes on two cores) into a build folder
# keyed by the venv's path, so every fresh clone paid for them again. Here they are compiled once
# per machine into a wheel, kept in a cache folder keyed by what the compiled code depends on
# (Python, torch and DeepSpeed versions, the CPU's architecture and instruction sets: DeepSpeed
# compiles with -march=native, and this script), and each new venv installs that wheel in
# seconds. Without libaio, or where the wheel's ops do not load, the plain DeepSpeed installs
# instead and compiles them on first use, as before. Two installs at once take turns (a lock).
#
# usage: tools/install_deepspeed.sh PYTHON CONSTRAINTS
set -euo pipefail
py=$1 constraints=$2
spec=$(grep -i '^deepspeed==' "$constraints")
version=${spec#*==}
cpu=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha1sum | cut -c1-8)
script=$(sha1sum "$0" | cut -c1-8)
key=$("$py" -c 'import platform, sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{platform.machine()}")')
cache=${REVCOL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/revcol-dist/wheels}/$key-cpu$cpu-$script
wheel=$cache/deepspeed-$version-compiled-ops.whl.d  # a folder: the wheel keeps its own file name
# the ops compiled in and loaded from the package (not compiled now by load()'s JIT fallback)
check='from deepspeed.git_version_info import installed_ops
from deepspeed.ops.op_builder import AsyncIOBuilder as B, PinMemoryBuilder as P
assert installed_ops.get("async_io") and installed_ops.get("pin_memory"), installed_ops
ops = [b().load() for b in (P, B)]
assert all(op.__name__.startswith("deepspeed.ops.") for op in ops), ops'

plain() {
  "$py" -m pip install -q --no-deps --force-reinstall --no-build-isolation -c "$constraints" "$spec"
}

build() {  # the wheel into "$wheel", or nothing
  local tmp
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  echo "building DeepSpeed with its async_io op compiled in, once per machine (~3 minutes on two cores): $cache"
  # LDFLAGS: DeepSpeed's CPU builder does not link a compiled-in op to libaio and OpenMP (its JIT
  # does; gcc links with --as-needed here, so -laio before the objects needs --no-as-needed).
  # --no-cache-dir: pip's cache may hold the plain wheel of this version, which it would take.
  if DS_BUILD_OPS=0 DS_BUILD_AIO=1 DS_ENABLE_NINJA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
       LDFLAGS="-Wl,--no-as-needed -laio -fopenmp ${LDFLAGS:-}" \
       "$py" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed --no-cache-dir -c "$constraints" \
       "$spec" -w "$tmp/whl" >"$tmp/log" 2>&1 \
     && "$py" -m zipfile -l "$tmp"/whl/deepspeed-*.whl | grep 'deepspeed/ops/aio/async_io_op' >/dev/null; then
    mv "$tmp/whl" "$wheel"  # one rename on the same file system: never half there
    rm -rf "$tmp"
  else
    mv "$tmp/log" "$cache/build.log" && rm -rf "$tmp"
    echo "warning: DeepSpeed's ops did not compile in (libaio-dev missing? see $cache/build.log); it compiles them on first use"
  fi
}

if ! mkdir -p "$cache" 2>/dev/null; then
  echo "warning: cannot write $cache; DeepSpeed compiles its ops on first use"
  plain
  exit 0
fi
exec 9>"$cache/.lock"
if command -v flock >/dev/null; then
  flock 9  # another install on this machine builds or checks the same wheel: wait for it
fi
[ -d "$wheel" ] || build
if [ -d "$wheel" ]; then
  file=$(ls "$wheel"/deepspeed-*.whl)
  if "$py" -m pip install -q -c "$constraints" "$file" \
     && "$py" -m pip install -q --no-deps --force-reinstall "$file" \
     && "$py" -c "$check" >/dev/null 2>&1; then
    exit 0
  fi
  echo "warning: the cached DeepSpeed wheel's ops do not load here; removed, DeepSpeed compiles them on first use"
  rm -rf "$wheel"
fi
plain
