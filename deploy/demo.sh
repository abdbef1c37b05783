#!/usr/bin/env bash
# The main job on one machine: a throwaway MariaDB with sample data, a collector and an
# agent talking over SSH on loopback. Ends with the stored backup's path and its
# verification (checksum, zstd stream, a restore compared with CHECKSUM TABLE).
# Normally run through: sudo ./deploy/bootstrap.sh demo
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$here/.venv/bin:$PATH"
demo="${DEMO_DIR:-$here/demo}"
rm -rf "$demo"
mkdir -p "$demo"/{keys,store,logs,mariadb}
chmod 700 "$demo/keys"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== 1. a throwaway MariaDB in $demo/mariadb"
user_args=()
[[ $(id -u) -eq 0 ]] && user_args=(--user=root)
mariadb-install-db --no-defaults --datadir="$demo/mariadb/data" "${user_args[@]}" \
  --auth-root-authentication-method=normal --skip-test-db >"$demo/mariadb/install.log" 2>&1
db_port=$(free_port)
sock="$demo/mariadb/mysql.sock"
mariadbd --no-defaults --datadir="$demo/mariadb/data" "${user_args[@]}" --socket="$sock" \
  --port="$db_port" --bind-address=127.0.0.1 --skip-name-resolve --log-bin=binlog \
  --server-id=1 --innodb-buffer-pool-size=64M >"$demo/mariadb/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  mariadb-admin --no-defaults --socket="$sock" -uroot ping >/dev/null 2>&1 && break
  sleep 0.2
done
admin=(mariadb --no-defaults --socket="$sock" -uroot)
backup_password=$(secret)
# The backup user gets what a consistent dump needs and nothing more.
"${admin[@]}" <<SQL
CREATE USER 'backhaul'@'127.0.0.1' IDENTIFIED BY '$backup_password';
GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES, PROCESS, BINLOG MONITOR
  ON *.* TO 'backhaul'@'127.0.0.1';
CREATE DATABASE hospital CHARACTER SET utf8mb4;
USE hospital;
CREATE TABLE patients (
  id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(100) NOT NULL,
  born DATE, ward VARCHAR(20), notes TEXT, photo BLOB, balance DECIMAL(12,2)
) ENGINE=InnoDB;
INSERT INTO patients (name, born, ward, notes, photo, balance)
SELECT CONCAT('Patient ', seq), DATE '1950-01-01' + INTERVAL (seq % 20000) DAY,
       ELT(1 + seq % 4, 'A', 'B', 'ICU', 'Maternité'), CONCAT('Follow-up ', seq, ' ✓'),
       UNHEX(SHA2(seq, 256)), seq * 1.25
FROM seq_1_to_20000;
CREATE VIEW icu AS SELECT id, name FROM patients WHERE ward = 'ICU';
CREATE DATABASE pharmacy;
CREATE TABLE pharmacy.stock (sku CHAR(8) PRIMARY KEY, qty INT NOT NULL) ENGINE=InnoDB;
INSERT INTO pharmacy.stock SELECT LPAD(seq, 8, '0'), seq % 97 FROM seq_1_to_5000;
SQL
install -m 600 /dev/null "$demo/keys/mysql.pass"
echo "$backup_password" > "$demo/keys/mysql.pass"

echo "== 2. keys: the collector's host key and the agent's key (ssh-keygen, ed25519)"
ssh-keygen -q -t ed25519 -N "" -C backhaul-collector -f "$demo/keys/collector_host_key"
ssh-keygen -q -t ed25519 -N "" -C backhaul-agent-db1 -f "$demo/keys/agent_db1"

collector_port=$(free_port)
metrics_port=$(free_port)
cat >"$demo/collector.toml" <<EOF
[server]
listen = "127.0.0.1:$collector_port"
host_key = "$demo/keys/collector_host_key"

[storage]
root = "$demo/store"
timezone = "local"

[log]
dir = "$demo/logs/collector"

[metrics]
listen = "127.0.0.1:$metrics_port"

[[agents]]
name = "db1"
public_key = "$demo/keys/agent_db1.pub"
databases = ["hospital", "pharmacy"]
EOF
cat >"$demo/agent.toml" <<EOF
[agent]
name = "db1"
state_dir = "$demo/agent-state"
run_dir = "$demo/agent-run"

[collector]
address = "127.0.0.1:$collector_port"
host_key = "$demo/keys/collector_host_key.pub"
client_key = "$demo/keys/agent_db1"

[log]
dir = "$demo/logs/agent"

[[sources]]
name = "main"
engine = "mysql"
host = "127.0.0.1"
port = $db_port
user = "backhaul"
password_file = "$demo/keys/mysql.pass"
databases = "all"
EOF

echo "== 3. the collector (backhaul-collector serve) on 127.0.0.1:$collector_port"
backhaul-collector serve --config "$demo/collector.toml" &
pids+=($!)
for _ in $(seq 100); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $collector_port), 1)" \
    2>/dev/null && break
  sleep 0.1
done

echo "== 4. the agent (backhaul-agent backup)"
backhaul-agent backup --config "$demo/agent.toml"

echo "== 5. what the administrator finds on the backup VM"
backup=$(ls "$demo"/store/db1/hospital/hospital_*.sql.zst)
manifest="$backup.manifest.json"
echo "stored:   $backup"
echo "manifest: $manifest"
expected=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['sha256'])" "$manifest")
actual=$(sha256sum "$backup" | cut -d' ' -f1)
[[ "$expected" == "$actual" ]] || { echo "SHA-256 MISMATCH" >&2; exit 1; }
echo "sha256:   $actual (matches the manifest)"
zstd -tq "$backup" && echo "zstd:     stream complete"
"${admin[@]}" -e "CREATE DATABASE hospital_restored"
zstd -dc "$backup" | "${admin[@]}" hospital_restored
original=$("${admin[@]}" -N -e "CHECKSUM TABLE hospital.patients" | cut -f2)
restored=$("${admin[@]}" -N -e "CHECKSUM TABLE hospital_restored.patients" | cut -f2)
[[ "$original" == "$restored" ]] || { echo "RESTORE MISMATCH" >&2; exit 1; }
echo "restore:  zstd -dc $(basename "$backup") | mariadb hospital_restored"
echo "          CHECKSUM TABLE patients: $restored in both (identical)"
echo "metrics:  curl -s http://127.0.0.1:$metrics_port/metrics | grep backhaul_backup_last"
curl -s "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null | grep '^backhaul_backup_last_success_timestamp' || true
echo "logs:     $demo/logs/collector/$(date +%Y%m%d).log"
echo "demo OK: $backup"
