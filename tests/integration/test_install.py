"""`deploy/install.sh` for real, then the README's two-VM walk-through through the installed
commands, with the collector and the agent on two "VMs" made by this test.

Each VM is a network namespace (its own loopback, and a veth link between the two with
addresses of TEST-NET-1, 192.0.2.0/24, which exist inside the namespaces only) plus its
own /etc/backhaul, /var/lib/backhaul*, /var/log/backhaul, /usr/local/bin and unit folder:
each command runs through ``ip netns exec``, which gives it a private mount namespace
where those folders are bind-mounted from the VM's folder under a temporary directory
(and /etc/netns/<name>/hosts becomes its /etc/hosts, naming "backup-vm"). The two VMs
share /opt/backhaul, as two VMs made from one image would, which also makes the second
install an upgrade in place. The system users the install creates (backhaul,
backhaul-agent) are real and stay, as after any package install.

There is no systemd here, so the services run as their users through ``setpriv`` and
``runuser``, and "systemctl reload" is the SIGHUP it sends. MariaDB runs inside the
agent's namespace on port 3306, so the example configurations work unchanged.

Needs root (namespaces, mounts, users); skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.mariadb_server import MariaDBServer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
COLLECTOR_IP, AGENT_IP = "192.0.2.1", "192.0.2.2"
# Folders each VM has of its own (inside path -> name of its folder on the host).
PRIVATE = {
    "/etc/backhaul": "etc",
    "/var/lib/backhaul": "lib",
    "/var/lib/backhaul-agent": "lib-agent",
    "/var/log/backhaul": "log",
    "/usr/local/bin": "bin",
    "/etc/systemd/system": "units",
    "/usr/lib/sysusers.d": "sysusers",
    "/usr/lib/tmpfiles.d": "tmpfiles",
}
MYSQL_PASSWORD = "the-password"  # as in the README
RAN: list[str] = []  # every shell command and SQL statement the walk-through ran, in order
# What a root shell on a fresh VM has: the installed commands, not this checkout's venv.
VM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TIMEOUT = 300
INSTALL = (str(REPO / "deploy" / "install.sh"),)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the install test needs root (namespaces, bind mounts, system users)"
    for tool in ("ip", "setpriv", "runuser", "systemd-sysusers", "systemd-tmpfiles", "zstd",
                 "mariadb"):
        if shutil.which(tool) is None:
            return f"the install test needs {tool}"
    if not Path("/usr/bin/python3").exists():
        return "install.sh installs with Debian's /usr/bin/python3, which is missing"
    return None


@dataclass
class VM:
    """One machine: a network namespace and its private folders."""

    name: str
    netns: str
    root: Path
    shared_opt: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def path(self, inside: str) -> Path:
        """Where an inside path of a private folder lies on the host."""
        for prefix, folder in sorted(PRIVATE.items(), key=lambda kv: -len(kv[0])):
            if inside == prefix or inside.startswith(prefix + "/"):
                return self.root / folder / inside[len(prefix):].lstrip("/")
        raise ValueError(f"{inside} is not a private folder of the VM")

    def argv(self, command: Sequence[str]) -> list[str]:
        mounts = [(self.root / folder, inside) for inside, folder in PRIVATE.items()]
        mounts.append((self.shared_opt, "/opt/backhaul"))
        binds = "".join(f"mount --bind '{src}' '{dst}' && " for src, dst in mounts)
        return ["ip", "netns", "exec", self.netns, "bash", "-c", binds + 'exec "$@"', "vm",
                *command]

    def run(self, *command: str, user: str | None = None, check: bool = True,
            stdin: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on this VM, as root or (through runuser) as ``user``."""
        if user is not None:
            command = ("runuser", "-u", user, "--", *command)
        if command[:2] == ("bash", "-c"):
            RAN.extend(command[2].split(" && "))
        else:
            RAN.append(" ".join(command))
        result = subprocess.run(self.argv(command), input=stdin, capture_output=True,
                                text=True, timeout=TIMEOUT, check=False,
                                env={**vm_env(), **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} on {self.name} exited "
                                 f"{result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def sh(self, script: str, *, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-c", script, env=env, check=check)

    def start_as(self, user: str, *command: str) -> subprocess.Popen[str]:
        """A service: ``setpriv`` execs it, so the process is the service itself."""
        proc = subprocess.Popen(
            self.argv(("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                       *command)),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=vm_env(),
        )
        self.procs.append(proc)
        return proc

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.path(
            "/var/log/backhaul").glob("*.log")))

    def wait_for_log(self, text: str, after: int = 0, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log()[after:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} in the log:\n{self.log()}")
            for proc in self.procs:
                if proc.poll() is not None:
                    output = proc.stdout.read() if proc.stdout else ""
                    raise AssertionError(f"{self.name}: service exited {proc.returncode}:\n"
                                         f"{output}\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def vm_env() -> dict[str, str]:
    return {**os.environ, "PATH": VM_PATH}


def sql(db: MariaDBServer, statement: str) -> None:
    RAN.append(statement)
    db.execute(statement)


class NamespacedMariaDB(MariaDBServer):
    """The test MariaDB, run inside the agent VM's namespace on the usual port."""

    def __init__(self, netns: str) -> None:
        super().__init__()
        self.netns = netns
        self.port = 3306

    def _server_command(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super()._server_command()]


@dataclass
class Site:
    collector: VM
    agent: VM
    mariadb: NamespacedMariaDB
    collector_install: subprocess.CompletedProcess[str]
    agent_install: subprocess.CompletedProcess[str]


def _network(tag: str) -> tuple[str, str]:
    collector, agent = f"bhc-{tag}", f"bha-{tag}"
    for netns in (collector, agent):
        subprocess.run(["ip", "netns", "add", netns], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    veth_c, veth_a = f"bhc{tag}", f"bha{tag}"
    subprocess.run(["ip", "link", "add", veth_c, "netns", collector, "type", "veth", "peer",
                    "name", veth_a, "netns", agent], check=True)
    for netns, dev, ip in ((collector, veth_c, COLLECTOR_IP), (agent, veth_a, AGENT_IP)):
        subprocess.run(["ip", "-n", netns, "addr", "add", f"{ip}/24", "dev", dev], check=True)
        subprocess.run(["ip", "-n", netns, "link", "set", dev, "up"], check=True)
        hosts = Path("/etc/netns") / netns / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{COLLECTOR_IP} backup-vm\n{AGENT_IP} db-vm-1\n")
    return collector, agent


def _wheelhouse(wheels: Path, src: Path) -> None:
    """Backhaul and its dependencies as wheels, made here (where pip may reach its index)
    for the VMs, which have no network: as a release tarball's wheels/ folder."""
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "agent", "collector", "common", "certs"):
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, src / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=TIMEOUT)
    os.environ["BACKHAUL_WHEELS"] = str(wheels)  # inherited by each VM's commands


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    """Both VMs installed with deploy/install.sh, MariaDB running on the agent VM."""
    reason = _why_not()
    if reason is not None:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    base = Path(tempfile.mkdtemp(prefix="bh-install-"))
    base.chmod(0o755)  # the service users walk through it to their bind-mounted folders
    # Made here, removed at the end: empty mount points, and ip's folder of netns files.
    made_mountpoints = [Path(p) for p in (*PRIVATE, "/opt/backhaul", "/etc/netns")
                        if not Path(p).exists()]
    netnses: list[str] = []
    vms: list[VM] = []
    mariadb: NamespacedMariaDB | None = None
    try:
        for mountpoint in made_mountpoints:
            mountpoint.mkdir(parents=True)
        netnses = list(_network(tag))
        (base / "opt").mkdir()
        for name, netns in zip(("collector", "agent"), netnses, strict=True):
            vm = VM(name, netns, base / name, base / "opt")
            for folder in PRIVATE.values():
                (vm.root / folder).mkdir(parents=True)
            vms.append(vm)
        collector, agent = vms
        _wheelhouse(base / "wheels", base / "src")
        collector_install = collector.run(*INSTALL, "collector")
        agent_install = agent.run(*INSTALL, "agent")
        mariadb = NamespacedMariaDB(agent.netns)
        mariadb.start()
        yield Site(collector, agent, mariadb, collector_install, agent_install)
    finally:
        for vm in vms:
            vm.stop()
        if mariadb is not None:
            mariadb.close()
        for netns in netnses:
            subprocess.run(["ip", "netns", "del", netns], check=False)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        os.environ.pop("BACKHAUL_WHEELS", None)
        shutil.rmtree(base, ignore_errors=True)
        for mountpoint in reversed(made_mountpoints):
            with contextlib.suppress(OSError):
                mountpoint.rmdir()


def mode(path: Path) -> tuple[str, str, str]:
    info = path.stat()
    return (f"{info.st_mode & 0o7777:04o}", pwd.getpwuid(info.st_uid).pw_name,
            grp.getgrgid(info.st_gid).gr_name)


def public_key(vm: VM, inside: str) -> str:
    return vm.path(inside).read_text().strip()


# -- the install itself ---------------------------------------------------------------------


def test_install_creates_users_folders_and_keys_with_owners_and_modes(site: Site) -> None:
    c, a = site.collector, site.agent
    assert mode(c.path("/etc/backhaul")) == ("0755", "root", "root")
    assert mode(c.path("/etc/backhaul/collector")) == ("0750", "root", "backhaul")
    assert mode(c.path("/etc/backhaul/agents.d")) == ("0750", "root", "backhaul")
    assert mode(c.path("/etc/backhaul/collector/ssh_host_ed25519_key")) == (
        "0640", "root", "backhaul")
    assert mode(c.path("/etc/backhaul/collector.toml")) == ("0640", "root", "backhaul")
    assert mode(c.path("/var/lib/backhaul")) == ("0700", "backhaul", "backhaul")
    assert mode(a.path("/etc/backhaul/agent")) == ("0750", "root", "backhaul-agent")
    assert mode(a.path("/etc/backhaul/agent/agent_key")) == ("0640", "root", "backhaul-agent")
    assert mode(a.path("/etc/backhaul/agent.toml")) == ("0640", "root", "backhaul-agent")
    for unit in ("backhaul-collector.service", "backhaul-prune.timer", "backhaul-verify.timer"):
        assert (c.path("/etc/systemd/system") / unit).is_file()
    assert (a.path("/etc/systemd/system") / "backhaul-agent.service").is_file()
    assert (c.path("/usr/local/bin") / "backhaul-collector").is_symlink()
    assert c.run("backhaul-collector", "--help").returncode == 0


def test_install_says_systemd_is_absent_and_ends_with_the_public_key(site: Site) -> None:
    for vm, output, key in (
        (site.collector, site.collector_install.stdout,
         "/etc/backhaul/collector/ssh_host_ed25519_key.pub"),
        (site.agent, site.agent_install.stdout, "/etc/backhaul/agent/agent_key.pub"),
    ):
        assert "systemd is not running here" in output
        assert "not enabled" in output
        assert public_key(vm, key) in output
        assert "Next steps" in output


def test_install_again_keeps_keys_and_configuration(site: Site) -> None:
    """Idempotent: a second run (an upgrade) changes no key and no edited config."""
    c = site.collector
    config = c.path("/etc/backhaul/collector.toml")
    key = public_key(c, "/etc/backhaul/collector/ssh_host_ed25519_key.pub")
    config.write_text(config.read_text() + "# edited by the administrator\n")
    again = c.run(*INSTALL, "collector")
    assert "keeping the existing /etc/backhaul/collector.toml" in again.stdout
    assert config.read_text().endswith("# edited by the administrator\n")
    assert public_key(c, "/etc/backhaul/collector/ssh_host_ed25519_key.pub") == key
    assert mode(config) == ("0640", "root", "backhaul")


# -- the README's walk-through --------------------------------------------------------------


def test_readme_walk_through_enrol_by_reload_backup_list_and_restore(site: Site) -> None:
    """Both services as their users; the agent is enrolled while the collector runs and
    taken up by SIGHUP; a first backup, `list`, `restore --into`, and a stock-tool
    restore of the stored file."""
    c, a, db = site.collector, site.agent, site.mariadb
    db.execute("CREATE DATABASE hospital")
    db.execute("CREATE TABLE hospital.patients (id INT PRIMARY KEY, name VARCHAR(40))")
    db.execute("INSERT INTO hospital.patients VALUES (1, 'Ada'), (2, 'Grace')")
    # The README's grants for the backup account.
    sql(db, f"CREATE USER 'backhaul'@'127.0.0.1' IDENTIFIED BY '{MYSQL_PASSWORD}';")
    sql(db, "GRANT SELECT, SHOW VIEW, TRIGGER, EVENT, LOCK TABLES, PROCESS, "
            "BINLOG MONITOR ON *.* TO 'backhaul'@'127.0.0.1';")

    # Collector VM: check as its user, then run it as its user (no agent yet).
    assert "also as user backhaul" in c.run(
        "backhaul-collector", "check-config", "--config", "/etc/backhaul/collector.toml",
        "--as-user", "backhaul").stdout
    c.start_as("backhaul", "backhaul-collector", "serve", "--config",
               "/etc/backhaul/collector.toml")
    c.wait_for_log("listening on 0.0.0.0:2222")

    # Key exchange: each side's public key, pasted on the other.
    host_key = public_key(c, "/etc/backhaul/collector/ssh_host_ed25519_key.pub")
    a.sh(f"echo '{host_key}' > /etc/backhaul/agent/collector_host_key.pub")
    agent_key = public_key(a, "/etc/backhaul/agent/agent_key.pub")
    c.sh(f"echo '{agent_key}' > /etc/backhaul/db-vm-1.pub")
    enrolled = c.run("backhaul-collector", "enrol-agent", "db-vm-1", "/etc/backhaul/db-vm-1.pub")
    assert "enrolled agent db-vm-1 (every database)" in enrolled.stdout
    mark = len(c.log())
    c.procs[0].send_signal(signal.SIGHUP)  # systemctl reload backhaul-collector
    c.wait_for_log("reloaded /etc/backhaul/collector.toml: 1 agent(s): db-vm-1", after=mark)

    # Agent VM: the password file, checks, a first backup, as the agent's user.
    a.sh("install -m 0640 -o root -g backhaul-agent /dev/null /etc/backhaul/agent/mysql.pass"
         f" && echo '{MYSQL_PASSWORD}' > /etc/backhaul/agent/mysql.pass")
    checked = a.run("backhaul-agent", "check-config", "--config", "/etc/backhaul/agent.toml",
                    "--as-user", "backhaul-agent")
    assert "source main: schedule 'daily 01:00' (the default), next run" in checked.stdout
    backup = a.run("backhaul-agent", "backup", "--config", "/etc/backhaul/agent.toml",
                   user="backhaul-agent")
    assert "1 stored, 0 failed" in backup.stdout, backup.stdout + backup.stderr

    listed = c.run("backhaul-collector", "list", "--config", "/etc/backhaul/collector.toml",
                   user="backhaul")
    assert "db-vm-1" in listed.stdout and "hospital_" in listed.stdout
    (stored,) = c.path("/var/lib/backhaul").glob("db-vm-1/hospital/hospital_*.sql.zst")

    # Restore through the agent, with the README's restore grants added.
    sql(db, "GRANT CREATE, DROP, INSERT, ALTER, INDEX, CREATE VIEW, CREATE ROUTINE, "
            "ALTER ROUTINE ON *.* TO 'backhaul'@'127.0.0.1';")
    restored = a.run("backhaul-agent", "restore", "--config", "/etc/backhaul/agent.toml",
                     "--database", "hospital", "--into", "hospital_restored",
                     user="backhaul-agent")
    assert f"restored {stored.name} into hospital_restored" in restored.stdout
    assert db.query("SELECT name FROM hospital_restored.patients ORDER BY id") == [
        ("Ada",), ("Grace",)]

    # Stock tools only: the file copied to the database VM, zstd and the mariadb client
    # (an administrator's ~/.my.cnf gives it the server's root login).
    home = Path(tempfile.mkdtemp(prefix="bh-admin-"))
    try:
        shutil.copy(stored, home / stored.name)
        shutil.copy(db.defaults_file, home / ".my.cnf")
        a.sh(f"cd {home} && mariadb -e 'CREATE DATABASE hospital_copy' && "
             f"zstd -dc {stored.name} | mariadb hospital_copy", env={"HOME": str(home)})
    finally:
        shutil.rmtree(home)
    assert db.query("SELECT COUNT(*) FROM hospital_copy.patients") == [(2,)]


# -- first-contact mistakes, through the installed commands ---------------------------------


def agent_check(site: Site, *extra: str) -> subprocess.CompletedProcess[str]:
    return site.agent.run("backhaul-agent", "check-config", "--config",
                          "/etc/backhaul/agent.toml", *extra, check=False)


@pytest.fixture
def agent_files(site: Site) -> Iterator[None]:
    """Puts back what a mistake test changed on the agent VM."""
    a = site.agent
    saved = {p: (p.read_bytes(), p.stat()) for p in (
        a.path("/etc/backhaul/agent.toml"), a.path("/etc/backhaul/agent/agent_key"))}
    password = a.path("/etc/backhaul/agent/mysql.pass")
    if not password.exists():
        a.sh("install -m 0640 -o root -g backhaul-agent /dev/null "
             f"/etc/backhaul/agent/mysql.pass && echo '{MYSQL_PASSWORD}' > "
             "/etc/backhaul/agent/mysql.pass")
    host_key = a.path("/etc/backhaul/agent/collector_host_key.pub")
    if not host_key.exists():
        host_key.write_text(public_key(site.collector,
                                       "/etc/backhaul/collector/ssh_host_ed25519_key.pub"))
    yield
    for path, (data, info) in saved.items():
        path.write_bytes(data)
        path.chmod(info.st_mode & 0o7777)
        os.chown(path, info.st_uid, info.st_gid)
    password.chmod(0o640)
    shutil.chown(password, "root", "backhaul-agent")
    host_key.write_text(public_key(site.collector,
                                   "/etc/backhaul/collector/ssh_host_ed25519_key.pub"))


def test_a_world_readable_password_file_is_refused_with_the_fix(
    site: Site, agent_files: None
) -> None:
    site.agent.path("/etc/backhaul/agent/mysql.pass").chmod(0o644)
    run = agent_check(site)
    assert run.returncode == 2
    assert ("password file /etc/backhaul/agent/mysql.pass is readable by everyone "
            "(mode 0644)") in run.stderr
    assert "chmod 600 /etc/backhaul/agent/mysql.pass" in run.stderr


def test_a_missing_pinned_collector_key_is_named(site: Site, agent_files: None) -> None:
    site.agent.path("/etc/backhaul/agent/collector_host_key.pub").unlink()
    run = agent_check(site)
    assert run.returncode == 2
    assert ("collector.host_key: /etc/backhaul/agent/collector_host_key.pub does not exist; "
            "copy the collector's public host key there") in run.stderr


def test_a_key_the_service_user_cannot_read_is_found_by_as_user(
    site: Site, agent_files: None
) -> None:
    """Root reads a 0600 root-owned key; the service's user cannot: --as-user says so."""
    site.agent.path("/etc/backhaul/agent/agent_key").chmod(0o600)
    assert agent_check(site).returncode == 0
    run = agent_check(site, "--as-user", "backhaul-agent")
    assert run.returncode == 2
    assert ("cannot read private key /etc/backhaul/agent/agent_key: Permission denied"
            in run.stderr), run.stderr
    assert "does not check out as user 'backhaul-agent'" in run.stderr


def test_source_in_the_singular_and_a_misspelt_key_get_a_suggestion(
    site: Site, agent_files: None
) -> None:
    config = site.agent.path("/etc/backhaul/agent.toml")
    text = config.read_text()
    config.write_text(text.replace("[[sources]]", "[[source]]"))
    singular = agent_check(site)
    config.write_text(text.replace("password_file", "pasword_file"))
    misspelt = agent_check(site)
    assert singular.returncode == misspelt.returncode == 2
    assert "source: unknown key; did you mean 'sources'?" in singular.stderr
    assert "pasword_file: unknown key; did you mean 'password_file'?" in misspelt.stderr


def test_a_collector_host_key_others_may_read_is_refused(site: Site) -> None:
    key = site.collector.path("/etc/backhaul/collector/ssh_host_ed25519_key")
    key.chmod(0o644)
    try:
        run = site.collector.run("backhaul-collector", "check-config", "--config",
                                 "/etc/backhaul/collector.toml", check=False)
    finally:
        key.chmod(0o640)
    assert run.returncode == 2
    assert "ssh_host_ed25519_key is readable by everyone (mode 0644)" in run.stderr


def _readme_commands() -> list[str]:
    """The shell and SQL lines of the README's install section, before the CA part."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Installing on two VMs"):text.index("With many agents")]
    lines = []
    for block in re.findall(r"```(?:sh|sql)\n(.*?)```", section, re.S):
        lines += [line for line in block.splitlines()
                  if line.strip() and not line.startswith("#")]
    return lines


def _normal(command: str) -> str:
    """A command with what differs per run written as the README writes it."""
    command = command.split("  #")[0].strip()
    command = command.replace(str(REPO), ".")
    command = re.sub(r"'ssh-ed25519 [^']*'", "'KEY'", command)
    return re.sub(r"hospital_\d{8}(-\d+)?\.sql", "hospital_DATE.sql", command)


def test_every_command_of_the_readme_install_section_was_run(site: Site) -> None:
    """The README's walk-through is what the tests above ran (systemctl excepted: there
    is no systemd here; the walk-through sends SIGHUP and runs the services with setpriv)."""
    ran = {_normal(command) for command in RAN}
    documented = [_normal(c) for c in _readme_commands() if not c.startswith("systemctl ")]
    assert len(documented) > 15
    missing = [command for command in documented if command not in ran]
    assert not missing, f"README commands no test ran: {missing}\nran: {sorted(ran)}"
