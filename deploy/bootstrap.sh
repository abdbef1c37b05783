#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for Backhaul and runs one of:
#   demo  - a collector, an agent and a throwaway MariaDB with sample data, end to end
#   test  - the whole test suite (lint, types, unit and integration tests)
# Run as root (it installs Debian packages): sudo ./deploy/bootstrap.sh demo|test
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
what="${1:-}"
case "$what" in
  demo|test|setup) ;;
  *) echo "usage: $0 demo|test|setup" >&2; exit 2 ;;
esac

# iproute2: tests/integration/test_install.py makes two network namespaces with `ip`.
packages=(mariadb-server mariadb-client postgresql postgresql-contrib zstd openssh-client prometheus prometheus-alertmanager systemd iproute2
          python3 python3-venv python3-dev gcc ca-certificates curl age)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "bootstrap: need root to install: ${missing[*]}" >&2
    exit 2
  fi
  export DEBIAN_FRONTEND=noninteractive
  # The packages' own services are not wanted here: tests and the demo start their own.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
export PATH="$here/.venv/bin:$PATH"

case "$what" in
  setup) echo "bootstrap: ready; commands are in $here/.venv/bin" ;;
  demo) exec bash deploy/demo.sh ;;
  test) exec bash deploy/run-tests.sh ;;
esac
