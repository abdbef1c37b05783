#!/usr/bin/env bash
# The whole check: lint, types, then every test (unit and integration against real
# servers the suite starts itself). pytest's "no tests ran" (exit 5) counts as failure.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== ruff"; ruff check . || exit 1
echo "== mypy --strict"; mypy || exit 1
# The dashboard builder lives in deploy/, outside the packages: its SDK types are its schema check.
echo "== mypy --strict deploy/grafana"; mypy --strict deploy/grafana/build_dashboard.py || exit 1
echo "== pytest"
python -m pytest -p no:cacheprovider -q "$@"
status=$?
if [[ $status -eq 5 ]]; then
  echo "run-tests: pytest collected no tests; treating that as a failure" >&2
  exit 1
fi
exit $status
