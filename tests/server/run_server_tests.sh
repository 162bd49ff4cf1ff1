#!/usr/bin/env bash
# Runs a server test script (test_server.py, or the one named by --script
# as the second argument) with the first Python that has the packages it
# needs: the one given (the .venv-test of scripts/install_deps.sh), else
# python3. Exit code 77 (ctest: skipped) when there is none.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
py_given="${1:-}"
shift || true
script=test_server.py
need="import openai"
if [ "${1:-}" = "--script" ]; then
  script="$2"
  shift 2
fi
[ "$script" = test_server_mpi.py ] && need="import gguf, numpy"
for py in "$py_given" python3; do
  if [ -n "$py" ] && "$py" -c "$need" >/dev/null 2>&1; then
    exec "$py" "$here/$script" "$@"
  fi
done
echo "SKIPPED: no Python that can '$need' (tried '$py_given' and python3); run scripts/install_deps.sh"
exit 77
