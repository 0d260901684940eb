#!/usr/bin/env bash
# Install DeepSpeed into a venv with its NVMe-offload ops (async_io, pin_memory) compiled in.
#
# Why: DeepSpeed compiles those ops on first use (~3 minutes on two cores) into a build folder
# keyed by the venv's path, so every fresh clone paid for them again. Here they are compiled once
# per machine into a wheel, kept in a cache folder keyed by Python, torch and DeepSpeed versions,
# and each new venv installs that wheel in seconds. Without libaio (or if the build fails) the
# plain DeepSpeed installs instead and compiles on first use, as before.
#
# (--no-cache-dir: pip's own cache may hold the plain wheel of the same version, which it would
# take instead of building.)
#
# usage: tools/install_deepspeed.sh PYTHON CONSTRAINTS
set -euo pipefail
py=$1 constraints=$2
spec=$(grep -i '^deepspeed==' "$constraints")
key=$("$py" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')
cache=${REVCOL_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/revcol-dist/wheels}/$key
wheel_of() { ls "$cache"/deepspeed-"${spec#*==}"-*.whl 2>/dev/null | head -n 1; }

if [ -z "$(wheel_of)" ]; then
  echo "building DeepSpeed with its async_io op compiled in, once per machine (~3 minutes on two cores): $cache"
  build=$(mktemp -d)
  # LDFLAGS: DeepSpeed's CPU builder does not link a compiled-in op to libaio and OpenMP (its JIT does;
  # gcc links with --as-needed here, so -laio before the objects needs --no-as-needed)
  if DS_BUILD_OPS=0 DS_BUILD_AIO=1 DS_ENABLE_NINJA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} LDFLAGS="-Wl,--no-as-needed -laio -fopenmp ${LDFLAGS:-}" \
       "$py" -m pip wheel -q --no-deps --no-build-isolation --no-binary deepspeed --no-cache-dir -c "$constraints" \
       "$spec" -w "$build" >"$build/log" 2>&1 \
     && unzip -Z1 "$build"/deepspeed-*.whl | grep 'deepspeed/ops/aio/async_io_op' >/dev/null; then
    mkdir -p "$cache" && mv "$build"/deepspeed-*.whl "$cache"/
  else
    echo "warning: DeepSpeed's ops did not compile in (libaio-dev missing?); it compiles them on first use"
    tail -n 5 "$build/log" || true
  fi
  rm -rf "$build"
fi

loads='from deepspeed.ops.op_builder import AsyncIOBuilder as B, PinMemoryBuilder as P; [b.load() for b in (P(), B())]'
if [ -n "$(wheel_of)" ]; then
  "$py" -m pip install -q -c "$constraints" "$(wheel_of)"  # its dependencies (the check below imports them)
  "$py" -m pip install -q --no-deps --force-reinstall "$(wheel_of)"  # over a plain one already there
  if ! "$py" -c "$loads" >/dev/null 2>&1; then
    echo "warning: the cached DeepSpeed wheel's ops do not load here; removed, DeepSpeed compiles them on first use"
    rm -f "$(wheel_of)"
  fi
fi
if [ -z "$(wheel_of)" ]; then
  "$py" -m pip install -q --no-deps --force-reinstall --no-build-isolation -c "$constraints" "$spec"
fi
