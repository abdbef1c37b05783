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
# Environment: BACKHAUL_PYTHON (default /usr/bin/python3), BACKHAUL_BIN_DIR
# (/usr/local/bin, for links to the commands), BACKHAUL_SYSTEMD_DIR (/etc/systemd/system),
# BACKHAUL_WHEELS (a folder of wheels to install from, offline; default: wheels/ beside
# deploy/ when present), BACKHAUL_SKIP_APT=1 to leave Debian packages alone.
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
# Fixed: the units, the example configurations and the tmpfiles rules name these paths.
prefix=/opt/backhaul
etc=/etc/backhaul
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
# From a wheel folder when there is one (a release tarball's wheels/, or BACKHAUL_WHEELS):
# Backhaul and every dependency, no network needed. Otherwise built from the source,
# dependencies from the package index.
wheels="${BACKHAUL_WHEELS:-$src/wheels}"
if [[ -d "$wheels" ]]; then
  say "installing Backhaul from the wheels in $wheels into $prefix"
  pip_from=(--no-index --find-links "$wheels")
  target=backhaul
else
  say "installing Backhaul from $src into $prefix"
  build="$(mktemp -d)"
  trap 'rm -rf "$build"' EXIT
  # A copy, so that a build leaves nothing in the clone (and works from a read-only one).
  cp -r "$src/pyproject.toml" "$src/README.md" "$src/agent" "$src/collector" "$src/common" \
    "$src/certs" "$build/"
  pip_from=()
  target="$build"
fi
"$prefix/bin/python" -m pip install -q "${pip_from[@]}" "$target"
# Again, Backhaul alone: an upgrade at an unchanged version number still takes the new code.
"$prefix/bin/python" -m pip install -q "${pip_from[@]}" --force-reinstall --no-deps "$target"
"$prefix/bin/backhaul-collector" --help >/dev/null
"$prefix/bin/backhaul-agent" --help >/dev/null
# On root's PATH, so that `backhaul-collector ...` works as typed.
bindir="${BACKHAUL_BIN_DIR:-/usr/local/bin}"
for program in backhaul-collector backhaul-agent backhaul-certs; do
  ln -sfn "$prefix/bin/$program" "$bindir/$program"
done

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
  # The per-database locks: systemd makes it for the unit (RuntimeDirectory=), tmpfiles
  # at boot; made now too, so a one-shot backup works before the service ever ran.
  install -d -m 0700 -o backhaul-agent -g backhaul-agent /run/backhaul-agent
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
    # Enabled, not started: the administrator starts it once the key exchange is done.
    # An upgrade restarts a service that was already running, on the new code.
    systemctl enable "$service"
    systemctl try-restart "$service"
  else
    say "not enabling $service: $config does not check out yet (see the next steps)"
  fi
else
  say "systemd is not running here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo '?')):" \
      "units installed in $systemd_dir, not enabled; start the service by hand"
fi

# --- next steps ----------------------------------------------------------------------
pub="$(cat "$key.pub")"
echo
echo "Backhaul $role installed in $prefix."
if [[ $role == collector ]]; then
  cat <<EOF
This collector's host key; on each database VM, after install.sh agent, put it in
$etc/agent/collector_host_key.pub:
  echo '$pub' > $etc/agent/collector_host_key.pub

Next steps (see README.md, "Installing on two VMs"):
  1. Check $config (listen address, storage root, retention).
  2. Enrol each agent with the public key its install.sh printed, then reload:
       echo 'ssh-ed25519 AAAA... backhaul-agent@db-vm-1' > /root/db-vm-1.pub
       backhaul-collector enrol-agent db-vm-1 /root/db-vm-1.pub
       systemctl reload backhaul-collector
  3. Check as the service's user and start:
       backhaul-collector check-config --config $config --as-user $user
       systemctl enable --now $service
EOF
else
  cat <<EOF
This agent's public key; on the collector VM, enrol it:
  echo '$pub' > /root/$(hostname).pub
  backhaul-collector enrol-agent NAME /root/$(hostname).pub

Next steps (see README.md, "Installing on two VMs"):
  1. Put the collector's host key (its install.sh printed it) in
     $etc/agent/collector_host_key.pub.
  2. Edit $config: [agent] name (the NAME enrolled), [collector] address, [[sources]].
  3. Put the database password in its password file, readable by the agent only:
       install -m 0640 -o root -g $user /dev/null $etc/agent/mysql.pass
       echo 'the-password' > $etc/agent/mysql.pass
  4. Check as the service's user, back up once, then start the service:
       backhaul-agent check-config --config $config --as-user $user
       runuser -u $user -- backhaul-agent backup --config $config
       systemctl enable --now $service
EOF
fi
