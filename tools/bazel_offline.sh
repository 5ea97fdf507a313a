#!/usr/bin/env bash
# Run `bazel test` offline with Debian's Bazel 4.2.3 (package bazel-bootstrap).
#
# Bazel 4 fetches @rules_cc, @rules_java and @remote_coverage_tools from the network even for
# py_test. Offline we point them at local copies:
#   rules_cc   — Debian's bazel-rules-cc, patched: it calls `use_cpp_toolchain()`, which
#                Bazel 4.2.3's @bazel_tools does not define (replaced by the toolchain type label);
#   rules_java — Debian's bazel-rules-java;  platforms — Debian's bazel-platforms;
#   remote_coverage_tools — a stub (coverage is not used).
# Tests run with the repository's virtual environment on PATH (`make install` builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v bazel >/dev/null; then
  echo "bazel not found. Install Debian's packages: apt-get install bazel-bootstrap bazel-rules-cc bazel-rules-java bazel-platforms" >&2
  exit 2
fi
for d in /usr/share/bazel/rules/cc /usr/share/bazel/rules/java /usr/share/bazel/tools/platforms; do
  [ -d "$d" ] || { echo "missing $d: apt-get install bazel-rules-cc bazel-rules-java bazel-platforms" >&2; exit 2; }
done
deps="$PWD/.bazel-deps"
rm -rf "$deps" && mkdir -p "$deps/remote_coverage_tools"
cp -r /usr/share/bazel/rules/cc "$deps/rules_cc"
grep -rl "use_cpp_toolchain" "$deps/rules_cc" | xargs sed -i -E \
  's/, "use_cpp_toolchain"\)/)/; s/toolchains = use_cpp_toolchain\(\),/toolchains = ["@bazel_tools\/\/tools\/cpp:toolchain_type"],/'
touch "$deps/remote_coverage_tools/WORKSPACE"
printf 'package(default_visibility=["//visibility:public"])\nsh_binary(name="coverage_report_generator", srcs=["gen.sh"])\n' \
  > "$deps/remote_coverage_tools/BUILD"
printf '#!/bin/sh\nexit 0\n' > "$deps/remote_coverage_tools/gen.sh" && chmod +x "$deps/remote_coverage_tools/gen.sh"
exec bazel --batch test "${@:-//:all}" \
  --test_output=errors \
  --test_env=PATH="$PWD/.venv/bin:/usr/bin:/bin" \
  --override_repository=rules_cc="$deps/rules_cc" \
  --override_repository=rules_java=/usr/share/bazel/rules/java \
  --override_repository=platforms=/usr/share/bazel/tools/platforms \
  --override_repository=remote_coverage_tools="$deps/remote_coverage_tools"
