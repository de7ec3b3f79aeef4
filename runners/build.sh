#!/usr/bin/env bash
# Build llama-server (and the RPC worker) once and cache it outside the repository.
#
#   runners/build.sh            build from the llama.cpp tree vendored in the
#                               llama-cpp-python sdist on PyPI (default)
#   LLAMA_CPP_SRC=dir runners/build.sh   build from a llama.cpp checkout
#
# The result lands in $OLLAMAD_RUNNERS_DIR/<source>-<backend>-<flags hash>/bin and the
# symlink $OLLAMAD_RUNNERS_DIR/current points at the newest build; ollamad looks there.
# A second run with the same source and flags does nothing.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
RUNNERS_DIR="${OLLAMAD_RUNNERS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ollamad/runners}"
JOBS="${OLLAMAD_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

say() { printf '[runners] %s\n' "$*" >&2; }
die() { printf '[runners] error: %s\n' "$*" >&2; exit 1; }

command -v cmake >/dev/null || die "cmake is not installed (Debian/Ubuntu: apt-get install cmake)"
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
  die "no C++ compiler found (Debian/Ubuntu: apt-get install build-essential)"
fi

backend=cpu
if command -v nvcc >/dev/null && { nvidia-smi -L >/dev/null 2>&1 || [ -e /dev/nvidia0 ]; }; then
  backend=cuda
fi
flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_CURL=OFF -DGGML_RPC=ON -DBUILD_SHARED_LIBS=OFF)
[ "$backend" = cuda ] && flags+=(-DGGML_CUDA=ON)
# GGML_NATIVE (the default) tunes for this CPU, so the CPU's features are part of the key; with
# CUDA it builds for the GPUs present only (seen on an H100: sm_90 alone), so their compute
# capabilities are part of it too: a build for one GPU does not run on another
cpu_sig=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | sha256sum | cut -c1-8 || echo any)
gpu_sig=""
[ "$backend" = cuda ] && gpu_sig=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | sort -u | paste -sd, || true)
flags_hash=$(printf '%s\n' "${flags[@]}" "$cpu_sig" "$(uname -m)" ${gpu_sig:+"$gpu_sig"} | sha256sum | cut -c1-10)

mkdir -p "$RUNNERS_DIR"
exec 9>"$RUNNERS_DIR/.lock"
flock 9   # one build at a time per cache

patches=()
if [ -n "${LLAMA_CPP_SRC:-}" ]; then
  src=$(cd "$LLAMA_CPP_SRC" && pwd) || die "LLAMA_CPP_SRC=$LLAMA_CPP_SRC is not a folder"
  [ -f "$src/CMakeLists.txt" ] && [ -d "$src/tools/server" -o -d "$src/examples/server" ] \
    || die "LLAMA_CPP_SRC=$src does not look like a llama.cpp checkout"
  if rev=$(git -C "$src" rev-parse --short=10 HEAD 2>/dev/null); then
    [ -z "$(git -C "$src" status --porcelain 2>/dev/null)" ] || rev="$rev-dirty$(git -C "$src" diff | sha256sum | cut -c1-6)"
    version="llama.cpp-$rev"
  else
    version="llama.cpp-$(find "$src" -name '*.c*' -o -name '*.h' -o -name CMakeLists.txt | sort | xargs cat | sha256sum | cut -c1-10)"
  fi
else
  # fixes of our own, applied to the downloaded source (never to a LLAMA_CPP_SRC checkout):
  # runners/patches/*.patch, named in the key and listed in the build's PATCHES file
  here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  for p in "$here"/patches/*.patch; do [ -f "$p" ] && patches+=("$p"); done
  version="llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
  [ ${#patches[@]} -gt 0 ] && version="$version-p$(cat "${patches[@]}" | sha256sum | cut -c1-6)"
fi

key="$version-$backend-$flags_hash"
dest="$RUNNERS_DIR/$key"
if [ -x "$dest/bin/llama-server" ] && [ -f "$dest/.complete" ]; then
  ln -sfn "$key" "$RUNNERS_DIR/current"
  say "cached: $dest/bin/llama-server"
  exit 0
fi

work="$RUNNERS_DIR/.work-$key"
mkdir -p "$work"
if [ -z "${LLAMA_CPP_SRC:-}" ]; then
  src="$work/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  if [ ! -f "$src/CMakeLists.txt" ]; then
    say "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist (llama.cpp source) from PyPI"
    py=$(command -v python3 || command -v python) || die "python3 is needed to download the source"
    "$py" -m pip download --quiet --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work/sdist" \
      || die "could not download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION; set LLAMA_CPP_SRC to a llama.cpp checkout or OLLAMAD_LLAMA_SERVER to a binary"
    tar -xzf "$work"/sdist/llama_cpp_python-*.tar.gz -C "$work" 2>/dev/null \
      || tar -xzf "$work"/sdist/llama-cpp-python-*.tar.gz -C "$work"
    [ -d "$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" ] && \
      mv "$work/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" "$work/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
    for p in "${patches[@]}"; do
      say "applying $(basename "$p")"
      (cd "$src" && patch -p1 --forward --quiet <"$p") \
        || { rm -rf "$work/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"; die "patch $(basename "$p") does not apply to llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"; }
    done
  fi
fi

gen=()
command -v ninja >/dev/null && gen=(-G Ninja)
say "building llama-server ($backend, $key) with $JOBS jobs; this takes several minutes the first time"
cmake -S "$src" -B "$work/build" "${gen[@]}" "${flags[@]}" >"$work/configure.log" 2>&1 \
  || { tail -n 30 "$work/configure.log" >&2; die "cmake configure failed (log: $work/configure.log)"; }
cmake --build "$work/build" --target llama-server -j "$JOBS"
rpc_target=ggml-rpc-server
cmake --build "$work/build" --target help 2>/dev/null | grep -qw ggml-rpc-server || rpc_target=rpc-server
cmake --build "$work/build" --target "$rpc_target" -j "$JOBS" || say "warning: the RPC worker did not build"

rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/bin"
cp "$work/build/bin/llama-server" "$dest.tmp/bin/"
[ -x "$work/build/bin/$rpc_target" ] && cp "$work/build/bin/$rpc_target" "$dest.tmp/bin/"
"$dest.tmp/bin/llama-server" --version >"$dest.tmp/VERSION" 2>&1 || die "the built llama-server does not run"
printf '%s\n' "${flags[@]}" >"$dest.tmp/FLAGS"
: >"$dest.tmp/PATCHES"
for p in "${patches[@]}"; do basename "$p" .patch >>"$dest.tmp/PATCHES"; done
touch "$dest.tmp/.complete"
rm -rf "$dest" && mv "$dest.tmp" "$dest"
ln -sfn "$key" "$RUNNERS_DIR/current"
rm -rf "$work"
say "built: $dest/bin/llama-server ($(head -n1 "$dest/VERSION"))"
