#!/usr/bin/env bash
# Runs test_server.py with the first Python that has the openai package: the
# one given (the .venv-test of scripts/install_deps.sh), else python3. Exit
# code 77 (ctest: skipped) when there is none.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
for py in "${1:-}" python3; do
  if [ -n "$py" ] && "$py" -c "import openai" >/dev/null 2>&1; then
    exec "$py" "$here/test_server.py" "${@:2}"
  fi
done
echo "SKIPPED: no Python with the openai package (tried '${1:-}' and python3); run scripts/install_deps.sh"
exit 77
