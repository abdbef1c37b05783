"""Checks of deploy/systemd: systemd's own verifier, the hardening, sysusers and tmpfiles.

``systemd-analyze verify`` insists that every Exec*= program exists, and the units name
/opt/backhaul/bin/…, which is not installed here. So the tests build a throwaway root:
the host's unit library (for targets such as multi-user.target), the units under test in
/etc/systemd/system, and executable stubs at every path the units run; then they verify
with ``--root``. No running systemd is needed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SYSTEMD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
HOST_UNIT_LIBRARY = Path("/usr/lib/systemd/system")
SERVICES = (
    "backhaul-collector.service",
    "backhaul-agent.service",
    "backhaul-prune.service",
    "backhaul-verify.service",
)
UNITS = (*SERVICES, "backhaul-prune.timer", "backhaul-verify.timer")

Sections = dict[str, dict[str, list[str]]]

# Every service carries these, each exactly once and with exactly this value.
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "CapabilityBoundingSet": "",
    "UMask": "0077",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "120s",
    "ConfigurationDirectory": "backhaul",
    "LogsDirectory": "backhaul",
}

PER_SERVICE: dict[str, dict[str, str]] = {
    "backhaul-collector.service": {
        "User": "backhaul",
        "Group": "backhaul",
        "ExecStart": (
            "/opt/backhaul/bin/backhaul-collector serve --config /etc/backhaul/collector.toml"
        ),
        "Restart": "on-failure",
        "StateDirectory": "backhaul",
        "ReadWritePaths": "/var/lib/backhaul /var/log/backhaul",
    },
    "backhaul-agent.service": {
        "User": "backhaul-agent",
        "Group": "backhaul-agent",
        "ExecStart": "/opt/backhaul/bin/backhaul-agent run --config /etc/backhaul/agent.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "ReadWritePaths": "/var/log/backhaul",
    },
    "backhaul-prune.service": {
        "Type": "oneshot",
        "User": "backhaul",
        "Group": "backhaul",
        "ExecStart": (
            "/opt/backhaul/bin/backhaul-collector prune --config /etc/backhaul/collector.toml"
        ),
        "StateDirectory": "backhaul",
        "ReadWritePaths": "/var/lib/backhaul /var/log/backhaul",
    },
    "backhaul-verify.service": {
        "Type": "oneshot",
        "User": "backhaul",
        "Group": "backhaul",
        "ExecStart": (
            "/opt/backhaul/bin/backhaul-collector verify --all --config "
            "/etc/backhaul/collector.toml"
        ),
        "StateDirectory": "backhaul",
        "ReadWritePaths": "/var/lib/backhaul /var/log/backhaul",
    },
}


def tool(name: str) -> str:
    """The path of a systemd tool; its absence fails the test, it never skips it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed, so deploy/systemd cannot be checked; "
            "install systemd (Debian: apt-get install -y systemd)"
        )
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0", "TZ": "UTC"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)


def parse_unit(text: str) -> Sections:
    """Sections of a unit file, each key with all its values in order (keys may repeat)."""
    sections: Sections = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, equals, value = line.partition("=")
        assert equals, f"line {number} is not key=value: {line!r}"
        assert current is not None, f"line {number} is outside any section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name: str) -> Sections:
    return parse_unit((SYSTEMD_DIR / name).read_text(encoding="utf-8"))


def programs(name: str) -> Iterator[str]:
    """The absolute program path of every Exec*= line of a unit."""
    for section in unit(name).values():
        for key, values in section.items():
            if key.startswith("Exec"):
                for value in values:
                    yield value.split()[0].lstrip("@-:+!|")


def install_units(root: Path, units: dict[str, str]) -> None:
    """Put ``units`` (name to text) into ``root``, with stubs for the programs they run."""
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text, encoding="utf-8")
    for name in units:
        for program in programs(name):
            stub = root / program.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
            stub.chmod(0o755)


@pytest.fixture(scope="module")
def unit_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (HOST_UNIT_LIBRARY / "multi-user.target").is_file():
        pytest.fail(f"{HOST_UNIT_LIBRARY} lacks systemd's targets; install systemd")
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(HOST_UNIT_LIBRARY, root / "usr" / "lib" / "systemd" / "system", symlinks=True)
    install_units(root, {name: (SYSTEMD_DIR / name).read_text(encoding="utf-8") for name in UNITS})
    return root


def verify(root: Path, name: str) -> tuple[int, list[str]]:
    """Exit status of ``systemd-analyze verify`` and its output lines about Backhaul."""
    analyze = tool("systemd-analyze")
    result = run(analyze, "verify", f"--root={root}", f"/etc/systemd/system/{name}")
    output = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in output if "backhaul" in line]


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_passes_cleanly(unit_root: Path, name: str) -> None:
    returncode, complaints = verify(unit_root, name)
    assert complaints == []
    assert returncode == 0


def test_verify_reports_a_misspelled_directive(tmp_path: Path, unit_root: Path) -> None:
    """The harness above would notice a broken unit: it is not passing vacuously."""
    root = tmp_path / "root"
    shutil.copytree(unit_root, root, symlinks=True)
    text = (SYSTEMD_DIR / "backhaul-agent.service").read_text(encoding="utf-8")
    install_units(root, {"backhaul-agent.service": text + "\n[Service]\nProtectHomz=yes\n"})
    _, complaints = verify(root, "backhaul-agent.service")
    assert any("Unknown key 'ProtectHomz'" in line for line in complaints)


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_every_hardening_directive(name: str) -> None:
    service = unit(name)["Service"]
    for key, expected in HARDENING.items():
        assert service.get(key) == [expected], f"{name}: {key}"
    assert service["SystemCallFilter"][0] == "@system-service", name


@pytest.mark.parametrize("name", SERVICES)
def test_service_runs_the_right_program_as_the_right_user(name: str) -> None:
    service = unit(name)["Service"]
    for key, expected in PER_SERVICE[name].items():
        assert service.get(key) == [expected], f"{name}: {key}"


def test_long_running_services_start_at_boot() -> None:
    for name in ("backhaul-collector.service", "backhaul-agent.service"):
        assert unit(name)["Install"]["WantedBy"] == ["multi-user.target"]


def test_prune_timer_fires_once_a_day_and_catches_up_after_downtime() -> None:
    timer = unit("backhaul-prune.timer")
    assert timer["Timer"]["Unit"] == ["backhaul-prune.service"]
    assert timer["Timer"]["Persistent"] == ["yes"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    (calendar,) = timer["Timer"]["OnCalendar"]
    result = run(tool("systemd-analyze"), "calendar", "--iterations=4", calendar)
    assert result.returncode == 0, result.stderr
    found = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+)", result.stdout)
    elapses = [datetime.fromisoformat(moment) for moment in found]
    assert len(elapses) == 4
    gaps = {later - earlier for earlier, later in pairwise(elapses)}
    assert gaps == {timedelta(days=1)}


def read_database(path: Path) -> dict[str, list[str]]:
    """An /etc/passwd or /etc/group file as name to fields."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return {fields[0]: fields for fields in (line.split(":") for line in lines if line)}


@pytest.fixture
def users_root(tmp_path: Path) -> Path:
    """A root holding only the accounts that backhaul.sysusers.conf creates."""
    (tmp_path / "etc").mkdir()
    conf = SYSTEMD_DIR / "backhaul.sysusers.conf"
    result = run(tool("systemd-sysusers"), f"--root={tmp_path}", str(conf))
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_sysusers_creates_locked_accounts_for_every_service_user(users_root: Path) -> None:
    passwd = read_database(users_root / "etc" / "passwd")
    groups = read_database(users_root / "etc" / "group")
    assert set(passwd) == {"backhaul", "backhaul-agent"}
    for name in SERVICES:
        service = unit(name)["Service"]
        (user,) = service["User"]
        (group,) = service["Group"]
        assert passwd[user][6] == "/usr/sbin/nologin"
        assert group in groups
        assert int(passwd[user][2]) < 1000, "a system account"


def test_tmpfiles_lets_each_service_read_but_not_change_its_config(users_root: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to hand files to root and the service groups")
    etc = users_root / "etc" / "backhaul"
    for folder in ("agent", "collector"):
        (etc / folder).mkdir(parents=True)
        (etc / folder / "id_ed25519").write_text("key\n", encoding="utf-8")
        (etc / f"{folder}.toml").write_text("\n", encoding="utf-8")
        # What a careless copy leaves behind: world-writable folder, world-readable files.
        (etc / folder).chmod(0o777)
        (etc / folder / "id_ed25519").chmod(0o666)
        (etc / f"{folder}.toml").chmod(0o666)
    conf = SYSTEMD_DIR / "backhaul.tmpfiles.conf"
    result = run(tool("systemd-tmpfiles"), f"--root={users_root}", "--create", str(conf))
    assert result.returncode == 0, result.stderr
    groups = read_database(users_root / "etc" / "group")
    expected_group = {"agent": "backhaul-agent", "collector": "backhaul"}
    for folder, group in expected_group.items():
        gid = int(groups[group][2])
        for path, mode in (
            (etc / folder, 0o750),
            (etc / folder / "id_ed25519", 0o640),
            (etc / f"{folder}.toml", 0o640),
        ):
            info = path.stat()
            assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (mode, 0, gid), path
    assert stat.S_IMODE(etc.stat().st_mode) == 0o755


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

# Runs in a child that first refuses itself writable-executable memory, as the services
# are under MemoryDenyWriteExecute=yes, then loads and exercises our C extensions.
MDWE_PROGRAM = f"""
import asyncio, ctypes, hashlib
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    raise SystemExit("PR_SET_MDWE unsupported")
import aiohttp, asyncssh, bson, psycopg, pymongo, pymysql, subprocess, zstandard
assert psycopg.pq.version() > 0  # libpq loaded
# The dump tools inherit the refusal: pg_dump (through Debian's Perl wrapper) still runs.
subprocess.run(["pg_dump", "--version"], check=True, capture_output=True)
key = asyncssh.generate_private_key("ssh-ed25519")
data = zstandard.ZstdCompressor().compress(b"x" * 100000)
assert zstandard.ZstdDecompressor().decompress(data) == b"x" * 100000
assert bson.decode(bson.encode({{"a": 1}})) == {{"a": 1}}
asyncio.run(asyncio.sleep(0))
print("ok", hashlib.sha256(key.export_public_key()).hexdigest()[:8])
"""


def test_python_and_its_libraries_run_without_writable_executable_memory() -> None:
    """MemoryDenyWriteExecute=yes is safe: CPython and our C extensions never need W+X."""
    result = run(sys.executable, "-c", MDWE_PROGRAM)
    if "PR_SET_MDWE unsupported" in result.stderr:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or later)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")
