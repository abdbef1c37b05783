#!/usr/bin/env bash
# Installs Backhaul on one Debian 12 machine, as root; safe to run again (idempotent).
#
#   sudo ./deploy/install.sh collector   the backup VM: SSH endpoint, store, prune/verify timers
#   sudo ./deploy/install.sh agent       a database VM: the agent that sends the dumps
#
# From a clone or an unpacked release tarball (this script's folder's parent is the
# source). It installs Backhaul into its own venv in /opt/backhaul, creates the system
# users and the folders under /etc/backhaul with the shipped sysusers/tmpfiles files,
# generates this host's SSH key if there is none, installs an example configuration only
# where none exists, and installs the systemd units. It never overwrites a configuration
# or a key, and starts nothing: the service is enabled once its configuration checks out.
# Where systemd is not running (a container), the enabling is skipped and said so.
#
# Environment: BACKHAUL_PREFIX (default /opt/backhaul), BACKHAUL_ETC (/etc/backhaul),
# BACKHAUL_PYTHON (/usr/bin/python3), BACKHAUL_SKIP_APT=1 to leave Debian packages alone.
set -euo pipefail

role="${1:-}"
case "$role" in
  collector|agent) ;;
  *) echo "usage: $0 collector|agent" >&2; exit 2 ;;
esac
if [[ $(id -u) -ne 0 ]]; then
  echo "install: run as root (sudo $0 $role)" >&2
  exit 2
fi

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${BACKHAUL_PREFIX:-/opt/backhaul}"
etc="${BACKHAUL_ETC:-/etc/backhaul}"
python="${BACKHAUL_PYTHON:-/usr/bin/python3}"
systemd_dir="${BACKHAUL_SYSTEMD_DIR:-/etc/systemd/system}"
say() { printf 'install: %s\n' "$*"; }

# --- Debian packages ---------------------------------------------------------------
packages=(python3 python3-venv openssh-client zstd ca-certificates)
[[ $role == agent ]] && packages+=(mariadb-client)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})) && [[ "${BACKHAUL_SKIP_APT:-0}" != 1 ]]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- Backhaul itself, in its own venv ----------------------------------------------
if [[ ! -x "$prefix/bin/python" ]]; then
  say "creating $prefix"
  "$python" -m venv "$prefix"
fi
say "installing Backhaul from $src into $prefix"
build="$(mktemp -d)"
trap 'rm -rf "$build"' EXIT
# Copy the source so that a build leaves nothing in the clone (and works from a
# read-only tarball): only what the package needs.
cp -r "$src/pyproject.toml" "$src/README.md" "$src/agent" "$src/collector" "$src/common" \
  "$src/certs" "$build/"
"$prefix/bin/python" -m pip install -q --upgrade "$build"
"$prefix/bin/backhaul-collector" --help >/dev/null
"$prefix/bin/backhaul-agent" --help >/dev/null

# --- users, folders, modes ---------------------------------------------------------
install -D -m 0644 "$src/deploy/systemd/backhaul.sysusers.conf" /usr/lib/sysusers.d/backhaul.conf
install -D -m 0644 "$src/deploy/systemd/backhaul.tmpfiles.conf" /usr/lib/tmpfiles.d/backhaul.conf
# Both work without a running systemd: they edit /etc/passwd and the file system.
systemd-sysusers /usr/lib/sysusers.d/backhaul.conf
install -d -m 0755 -o root -g root "$etc"
if [[ $role == collector ]]; then
  user=backhaul
  keydir="$etc/collector"
  install -d -m 0750 -o root -g backhaul "$keydir" "$etc/agents" "$etc/agents.d"
  install -d -m 0700 -o backhaul -g backhaul /var/lib/backhaul
else
  user=backhaul-agent
  keydir="$etc/agent"
  install -d -m 0750 -o root -g backhaul-agent "$keydir"
  install -d -m 0700 -o backhaul-agent -g backhaul-agent /var/lib/backhaul-agent
fi
install -d -m 0750 -o "$user" -g "$user" /var/log/backhaul

# --- this host's key -----------------------------------------------------------------
if [[ $role == collector ]]; then
  key="$keydir/ssh_host_ed25519_key"
  comment="backhaul-collector@$(hostname)"
else
  key="$keydir/agent_key"
  comment="backhaul-agent@$(hostname)"
fi
if [[ ! -e "$key" ]]; then
  say "generating $key"
  ssh-keygen -q -t ed25519 -N '' -C "$comment" -f "$key"
fi
# Owner root, readable by the service's group only: the service reads it, never changes it.
chown root:"$user" "$key" "$key.pub"
chmod 0640 "$key"
chmod 0644 "$key.pub"

# --- example configuration, only if there is none ------------------------------------
config="$etc/$role.toml"
if [[ ! -e "$config" ]]; then
  say "installing an example configuration at $config (edit it before starting)"
  install -m 0640 -o root -g "$user" "$src/deploy/examples/$role.toml" "$config"
else
  say "keeping the existing $config"
fi
# The shipped rules for everything above (also applied at every boot).
systemd-tmpfiles --create /usr/lib/tmpfiles.d/backhaul.conf

# --- systemd units -------------------------------------------------------------------
if [[ $role == collector ]]; then
  units=(backhaul-collector.service backhaul-prune.service backhaul-prune.timer
         backhaul-verify.service backhaul-verify.timer)
  service=backhaul-collector.service
else
  units=(backhaul-agent.service)
  service=backhaul-agent.service
fi
install -d "$systemd_dir"
for unit in "${units[@]}"; do
  install -m 0644 "$src/deploy/systemd/$unit" "$systemd_dir/$unit"
done

# Is the configuration complete? Checked as the service's user, as the service will run.
configured=0
if runuser -u "$user" -- "$prefix/bin/backhaul-$role" check-config --config "$config" \
    >/dev/null 2>&1; then
  configured=1
fi
if [[ -d /run/systemd/system ]]; then
  systemctl daemon-reload
  if [[ $role == collector ]]; then
    systemctl enable backhaul-prune.timer backhaul-verify.timer
  fi
  if ((configured)); then
    systemctl enable "$service"
    systemctl reload-or-restart "$service"
  else
    say "not enabling $service: $config does not check out yet"
  fi
else
  say "systemd is not running here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo '?')):" \
      "units installed in $systemd_dir, not enabled or started"
fi

# --- next steps ----------------------------------------------------------------------
pub="$(cat "$key.pub")"
echo
echo "Backhaul $role installed in $prefix."
if [[ $role == collector ]]; then
  cat <<EOF
This collector's host key (agents pin it; copy it to each agent VM as
$etc/agent/collector_host_key.pub):
  $pub

Next steps:
  1. Edit $config (listen address, storage root, retention).
  2. For each agent VM, copy its public key here and enrol it:
       sudo $prefix/bin/backhaul-collector enrol-agent NAME /path/to/NAME.pub
  3. Check and start:
       sudo -u backhaul $prefix/bin/backhaul-collector check-config --config $config
       sudo systemctl enable --now $service
     (later enrolments: sudo systemctl reload $service)
EOF
else
  cat <<EOF
This agent's public key (enrol it on the collector with
backhaul-collector enrol-agent NAME FILE):
  $pub

Next steps:
  1. Copy the collector's host key here: $etc/agent/collector_host_key.pub (mode 0644).
  2. Edit $config: [agent] name, [collector] address, the [[sources]].
  3. Put the database password in its password file, readable by the agent only:
       sudo install -m 0640 -o root -g backhaul-agent /dev/null $etc/agent/mysql.pass
       sudo editor $etc/agent/mysql.pass
  4. Check, back up once, then start the service:
       sudo -u backhaul-agent $prefix/bin/backhaul-agent check-config --config $config
       sudo -u backhaul-agent $prefix/bin/backhaul-agent backup --config $config
       sudo systemctl enable --now $service
EOF
fi
