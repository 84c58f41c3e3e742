#!/usr/bin/env bash
# Build edgepipe's native ExecuTorch runner (native/executorch/et_runner.cpp) against the executorch pip wheel's
# prebuilt C++ runtime, and copy the wheel's libraries beside it so build/native/executorch/ moves to a device whole.
#
#   scripts/build_native_runner.sh [PYTHON]     # PYTHON: the interpreter whose executorch to build against
#
# Needs cmake >= 3.19, a C++17 compiler and ninja or make. The result: build/native/executorch/edgepipe_et_runner
# and build/native/executorch/lib/*.so (rpath $ORIGIN/lib). `edgepipe bench --runner native` looks there (or at
# $EDGEPIPE_NATIVE_RUNNER). x86-64 here; an aarch64 build needs an aarch64 executorch wheel and a cross toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${1:-python3}"
root="$("$python" -c 'import importlib.util, os; s = importlib.util.find_spec("executorch"); print(list(s.submodule_search_locations)[0])')"
out=build/native/executorch
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S native/executorch -B "$out/cmake" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$root"
cmake --build "$out/cmake"
mkdir -p "$out/lib"
cp "$out/cmake/edgepipe_et_runner" "$out/"
cp "$root"/lib/libexecutorch*.so "$out/lib/"
echo "built $out/edgepipe_et_runner against executorch at $root"
