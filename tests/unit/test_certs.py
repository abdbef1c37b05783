"""Key and certificate tooling: files, certificate fields, revocation lists, the CLI."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from certs import ca, cli
from common.certificates import CertificateInfo, format_time, parse_time
from common.errors import ConfigError, ExitCode
from common.identity import AgentAuthenticator, key_fp, known_hosts_for
from common.revocation import RevocationEntry, RevocationList

FP = "SHA256:" + "A" * 43
OTHER_FP = "SHA256:" + "B" * 43


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def authority(tmp_path: Path) -> ca.CertificateAuthority:
    return ca.CertificateAuthority.create(tmp_path / "ca")


@pytest.fixture
def agent_key(tmp_path: Path) -> ca.KeyPairFiles:
    return ca.generate_key_pair(tmp_path / "keys", "db1", comment="backhaul-agent:db1")


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """A umask that would leave new files world-readable and writable."""
    old = os.umask(0)
    yield
    os.umask(old)


# --- the CA and key files -------------------------------------------------------------


@pytest.mark.usefixtures("loose_umask")
def test_ca_private_key_is_0600_and_public_key_beside_it(tmp_path: Path) -> None:
    authority = ca.CertificateAuthority.create(tmp_path / "ca")
    assert mode_of(tmp_path / "ca" / ca.CA_KEY) == 0o600
    assert mode_of(tmp_path / "ca") == 0o700
    public = asyncssh.read_public_key(authority.public_key_path)
    assert key_fp(public) == authority.fingerprint
    assert mode_of(authority.public_key_path) == 0o644


def test_private_files_are_created_exclusively_with_mode_0600(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file holding a secret is born 0600 by O_CREAT|O_EXCL: never readable by others."""
    opened: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: int) -> int:
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", spy)
    ca.CertificateAuthority.create(tmp_path / "ca")
    ca.generate_key_pair(tmp_path / "keys", "db1", comment="x")
    secret_writes = [
        (flags, mode)
        for path, flags, mode in opened
        if re.fullmatch(r"\.(ca_key|db1)\.[0-9a-f]{12}\.tmp", Path(path).name)
    ]
    assert len(secret_writes) == 2
    for flags, mode in secret_writes:
        assert flags & os.O_CREAT and flags & os.O_EXCL
        assert mode == 0o600


def test_init_ca_refuses_to_replace_a_ca_without_force(tmp_path: Path) -> None:
    first = ca.CertificateAuthority.create(tmp_path / "ca")
    with pytest.raises(ConfigError, match="already exists; use --force"):
        ca.CertificateAuthority.create(tmp_path / "ca")
    second = ca.CertificateAuthority.create(tmp_path / "ca", force=True)
    assert second.fingerprint != first.fingerprint
    assert mode_of(tmp_path / "ca" / ca.CA_KEY) == 0o600
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca_key", "ca_key.pub", "serial"]


def test_loading_a_ca_whose_key_others_can_read_is_refused(
    authority: ca.CertificateAuthority,
) -> None:
    (authority.directory / ca.CA_KEY).chmod(0o640)
    with pytest.raises(ConfigError, match=r"readable by its group.*chmod 600"):
        ca.CertificateAuthority.load(authority.directory)


def test_agent_key_pair_is_ed25519_with_private_key_0600(agent_key: ca.KeyPairFiles) -> None:
    assert mode_of(agent_key.private) == 0o600
    private = asyncssh.read_private_key(agent_key.private)
    assert private.get_algorithm() == "ssh-ed25519"
    assert asyncssh.read_public_key(agent_key.public) == private.convert_to_public()


# --- certificates ---------------------------------------------------------------------


def test_agent_certificate_names_the_agent_with_serial_and_validity(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles
) -> None:
    now = 1_800_000_000.0
    issued = authority.issue_agent("db1", agent_key.public, validity="+52w", now=now)
    assert issued.path == agent_key.public.with_name("db1-cert.pub")
    info = ca.read_certificate(issued.path)
    assert info == issued.info
    assert info.kind == "user"
    assert info.principals == ("db1",)
    assert info.serial == 1
    assert info.key_id == "agent:db1:1"
    assert info.valid_after == int(now) - ca.CLOCK_SKEW
    assert info.valid_before == int(now) + 52 * 7 * 86400
    assert info.key_fingerprint == key_fp(asyncssh.read_public_key(agent_key.public))
    assert info.ca_fingerprint == authority.fingerprint


def test_serials_increase_with_each_certificate(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles, tmp_path: Path
) -> None:
    serials = [
        authority.issue_agent("db1", agent_key.public, output=tmp_path / f"c{i}").info.serial
        for i in range(3)
    ]
    reloaded = ca.CertificateAuthority.load(authority.directory)
    host = reloaded.issue_host(["backup.example"], agent_key.public, output=tmp_path / "h")
    assert [*serials, host.info.serial] == [1, 2, 3, 4]


def test_agent_certificate_grants_no_shell_features(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles
) -> None:
    issued = authority.issue_agent("db1", agent_key.public)
    cert = asyncssh.read_certificate(issued.path)
    assert isinstance(cert, asyncssh.SSHCertificate)
    assert not any(v for k, v in getattr(cert, "options", {}).items() if k.startswith("permit-"))


def test_host_certificate_lists_every_host_name(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles, tmp_path: Path
) -> None:
    issued = authority.issue_host(
        ["backup.example", "10.0.0.5"], agent_key.public, output=tmp_path / "host-cert.pub"
    )
    assert issued.info.kind == "host"
    assert issued.info.principals == ("backup.example", "10.0.0.5")
    assert issued.info.key_id == f"host:backup.example:{issued.info.serial}"


@pytest.mark.parametrize("name", ["", "../etc", ".hidden", "a b", "a/b", "x" * 65])
def test_unsafe_agent_names_are_refused(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles, name: str
) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        authority.issue_agent(name, agent_key.public)


def test_issuing_refuses_to_overwrite_a_certificate(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles
) -> None:
    first = authority.issue_agent("db1", agent_key.public)
    with pytest.raises(ConfigError, match="already exists"):
        authority.issue_agent("db1", agent_key.public)
    second = authority.issue_agent("db1", agent_key.public, force=True)
    assert ca.read_certificate(first.path).serial == second.info.serial == 2  # none wasted


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")
def test_certificate_fields_agree_with_ssh_keygen(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles
) -> None:
    issued = authority.issue_agent("db1", agent_key.public, now=1_800_000_000)
    listing = subprocess.run(
        ["ssh-keygen", "-L", "-f", str(issued.path)], check=True, capture_output=True, text=True
    ).stdout
    assert 'Key ID: "agent:db1:1"' in listing
    assert "Serial: 1" in listing
    assert "user certificate" in listing
    assert listing.split("Principals:")[1].split()[0] == "db1"


def test_x509_or_garbage_is_not_read_as_a_certificate(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus-cert.pub"
    bogus.write_text("ssh-ed25519-cert-v01@openssh.com AAAAnotbase64 x\n")
    with pytest.raises(ConfigError, match="not an OpenSSH certificate"):
        ca.read_certificate(bogus)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("+52w", 52 * 604800), ("7d", 7 * 86400), ("+1w2d12h", 9 * 86400 + 43200), ("90s", 90)],
)
def test_durations_parse(text: str, seconds: int) -> None:
    assert ca.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "+", "52", "+52y", "-1d", "+0d", "+1d ago", "+99999w"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="bad duration"):
        ca.parse_duration(text)


# --- revocation list ------------------------------------------------------------------


def test_revocation_list_parses_entries_comments_and_times() -> None:
    text = f"""
    # header comment

    key {FP}            # the old laptop
    serial 42
    key-id agent:db1:7 from 2030-01-02T03:04:05Z
    """
    revocations = RevocationList.parse(text)
    assert revocations.entries == (
        RevocationEntry("key", FP),
        RevocationEntry("serial", "42"),
        RevocationEntry("key-id", "agent:db1:7", parse_time("2030-01-02T03:04:05Z")),
    )
    assert revocations.revokes_key(FP, time.time())
    assert not revocations.revokes_key(OTHER_FP, time.time())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("serial", "expected"),
        ("serial 1 2", "expected"),
        ("certificate 5", "unknown entry type"),
        ("serial -5", "serial number"),
        (f"serial {2**64}", "serial number"),
        ("key SHA256:short", "fingerprint"),
        ("key MD5:aa:bb", "fingerprint"),
        ("serial 5 from tomorrow", "bad time"),
        ("serial 5 until 2030-01-01T00:00:00Z", "expected"),
    ],
)
def test_malformed_revocation_lines_name_file_and_line(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"revoked\.txt, line 3: .*{message}"):
        RevocationList.parse(f"# ok\nserial 1\n{line}\n", "revoked.txt")


def test_revocation_applies_from_its_effective_time() -> None:
    effective = 2_000_000_000
    revocations = RevocationList((RevocationEntry("key", FP, effective),))
    assert not revocations.revokes_key(FP, effective - 1)
    assert revocations.revokes_key(FP, effective)


def test_certificate_is_revoked_by_serial_key_id_key_or_ca() -> None:
    info = CertificateInfo("user", "agent:db1:9", 9, ("db1",), 0, 2**40, FP, OTHER_FP)
    now = time.time()
    for entry in (
        RevocationEntry("serial", "9"),
        RevocationEntry("key-id", "agent:db1:9"),
        RevocationEntry("key", FP),
        RevocationEntry("key", OTHER_FP),
    ):
        assert RevocationList((entry,)).revokes_certificate(info, now), entry
    unrelated = RevocationList((RevocationEntry("serial", "10"), RevocationEntry("key-id", "x")))
    assert not unrelated.revokes_certificate(info, now)


def test_appended_entries_round_trip_with_header(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    ca.append_revocations(path, [RevocationEntry("serial", "3")], "lost\nlaptop")
    ca.append_revocations(path, [RevocationEntry("key", FP, 2_000_000_000)])
    text = path.read_text()
    assert text.startswith("# Backhaul revocation list")
    assert "serial 3  # lost laptop\n" in text
    assert f"key {FP} from {format_time(2_000_000_000)}\n" in text
    assert ca.load_revocation_list(path).entries == (
        RevocationEntry("serial", "3"),
        RevocationEntry("key", FP, 2_000_000_000),
    )


def test_appending_to_a_malformed_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("serial x\n")
    with pytest.raises(ConfigError, match="line 1"):
        ca.append_revocations(path, [RevocationEntry("serial", "3")])
    assert path.read_text() == "serial x\n"


def test_rotation_archives_old_files_and_revokes_them_after_grace(
    authority: ca.CertificateAuthority, agent_key: ca.KeyPairFiles, tmp_path: Path
) -> None:
    old = authority.issue_agent("db1", agent_key.public)
    old_fp = old.info.key_fingerprint
    now = 1_900_000_000.0
    path = tmp_path / "revoked.txt"
    rotation = ca.rotate_agent(
        authority, "db1", agent_key.private.parent, path, grace="7d", now=now
    )
    assert rotation.certificate.info.serial == old.info.serial + 1
    assert rotation.certificate.info.key_fingerprint != old_fp
    assert sorted(p.name for p in rotation.archived.iterdir()) == ["db1", "db1-cert.pub", "db1.pub"]
    assert mode_of(rotation.archived / "db1") == 0o600
    effective = int(now) + 7 * 86400
    assert ca.load_revocation_list(path).entries == (
        RevocationEntry("key", old_fp, effective),
        RevocationEntry("serial", str(old.info.serial), effective),
    )


# --- collector and agent trust, without a network ------------------------------------


def test_authenticator_without_agents_lets_nobody_in(agent_key: ca.KeyPairFiles) -> None:
    """A fresh collector, before any enrolment: it starts, and admits no one."""
    auth = AgentAuthenticator({}, None, None)
    assert auth.admits_nobody
    key = asyncssh.read_public_key(str(agent_key.public))
    assert not auth.validate_public_key("db1", key)


def test_authenticator_refuses_one_key_for_two_agents(agent_key: ca.KeyPairFiles) -> None:
    with pytest.raises(ConfigError, match="same key as agent 'a'"):
        AgentAuthenticator({"a": agent_key.public, "b": agent_key.public}, None, None)


def test_authenticator_refuses_a_broken_revocation_list_at_start(
    agent_key: ca.KeyPairFiles, tmp_path: Path
) -> None:
    broken = tmp_path / "revoked.txt"
    broken.write_text("revoke everything\n")
    with pytest.raises(ConfigError, match=r"revoked\.txt, line 1"):
        AgentAuthenticator({"db1": agent_key.public}, None, broken)


def test_listed_key_is_refused_while_revocation_list_is_unreadable(
    agent_key: ca.KeyPairFiles, tmp_path: Path
) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("")
    auth = AgentAuthenticator({"db1": agent_key.public}, None, path)
    key = asyncssh.read_public_key(agent_key.public)
    assert auth.validate_public_key("db1", key)
    assert not auth.validate_public_key("db2", key)
    path.write_text("this is not a revocation list\n")
    assert not auth.validate_public_key("db1", key)
    path.unlink()
    assert not auth.validate_public_key("db1", key)
    path.write_text("# fixed\n")
    assert auth.validate_public_key("db1", key)


def test_known_hosts_needs_a_pinned_key_or_a_ca() -> None:
    with pytest.raises(ConfigError, match="pinned host key or the CA"):
        known_hosts_for("backup.example", 22, None, None)


@pytest.mark.parametrize("host", ["*", "a b", "[x]:1", "bad_host,other", "-x.example", ""])
def test_known_hosts_refuses_host_patterns(host: str, agent_key: ca.KeyPairFiles) -> None:
    with pytest.raises(ConfigError, match="not a host name"):
        known_hosts_for(host, 22, agent_key.public, None)


def test_known_hosts_refuses_a_private_key_as_pinned_key(agent_key: ca.KeyPairFiles) -> None:
    with pytest.raises(ConfigError, match="is a private key"):
        known_hosts_for("backup.example", 2222, agent_key.private, None)


# --- the command line -----------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_enrols_an_agent_in_three_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_dir, keys = str(tmp_path / "ca"), str(tmp_path / "keys")
    assert run_cli(capsys, "init-ca", "--dir", ca_dir)[0] == ExitCode.OK
    assert run_cli(capsys, "agent-key", "--name", "db1", "--dir", keys)[0] == ExitCode.OK
    pub = str(tmp_path / "keys" / "db1.pub")
    code, out, _ = run_cli(
        capsys, "issue-agent", "--ca", ca_dir, "--name", "db1", "--pubkey", pub, "--validity", "+4w"
    )
    assert code == ExitCode.OK
    assert "serial 1 for db1" in out
    code, out, _ = run_cli(capsys, "show", str(tmp_path / "keys" / "db1-cert.pub"))
    assert code == ExitCode.OK
    assert "principals: db1" in out
    assert "serial:     1" in out
    assert "valid:" in out


def test_cli_show_prints_fingerprint_of_a_plain_public_key(
    agent_key: ca.KeyPairFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(capsys, "show", str(agent_key.public))
    assert code == ExitCode.OK
    assert key_fp(asyncssh.read_public_key(agent_key.public)) in out


def test_cli_revokes_by_key_file_and_by_serial(
    agent_key: ca.KeyPairFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rl = str(tmp_path / "revoked.txt")
    assert run_cli(capsys, "revoke", "--list", rl, "--key", str(agent_key.public))[0] == 0
    assert run_cli(capsys, "revoke", "--list", rl, "--serial", "17", "--grace", "2d")[0] == 0
    assert run_cli(capsys, "revoke", "--list", rl, "--key", FP)[0] == 0
    kinds = [(e.kind, e.effective is None) for e in ca.load_revocation_list(Path(rl)).entries]
    assert kinds == [("key", True), ("serial", False), ("key", True)]


ISSUE = ["issue-agent", "--ca", "{ca}", "--name"]
REVOKE = ["revoke", "--list", "{tmp}/rl"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["issue-agent", "--ca", "{tmp}/nope", "--name", "db1", "--pubkey", "{pub}"], "no CA in"),
        ([*ISSUE, "db1", "--pubkey", "{tmp}/no.pub"], "does not exist"),
        ([*ISSUE, "db1", "--pubkey", "{priv}"], "is a private key"),
        ([*ISSUE, "db1", "--pubkey", "{junk}"], "not an OpenSSH public key"),
        ([*ISSUE, "../x", "--pubkey", "{pub}"], "not allowed"),
        ([*ISSUE, "db1", "--pubkey", "{pub}", "--validity", "1y"], "bad duration"),
        (["issue-host", "--ca", "{ca}", "--hostname", "a b", "--pubkey", "{pub}"], "host name"),
        (["init-ca", "--dir", "{ca}"], "already exists; use --force"),
        (["agent-key", "--name", "db1", "--dir", "{keys}"], "already exists; use --force"),
        (["show", "{tmp}/missing-cert.pub"], "does not exist"),
        (["show", "{junk}"], "not an OpenSSH public key"),
        ([*REVOKE, "--key", "SHA256:nope"], "not a SHA256 key fingerprint"),
        ([*REVOKE, "--key", "{tmp}/gone.pub"], "does not exist"),
        ([*REVOKE, "--key-id", "has#hash"], "not a usable key id"),
        (["rotate", "--ca", "{ca}", "--name", "web", "--dir", "{keys}", *REVOKE[1:]], "not exist"),
    ],
)
def test_cli_user_mistakes_get_one_line_and_config_exit_code(
    argv: list[str],
    message: str,
    authority: ca.CertificateAuthority,
    agent_key: ca.KeyPairFiles,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("hello world\n")
    names = {
        "tmp": str(tmp_path),
        "ca": str(authority.directory),
        "keys": str(agent_key.private.parent),
        "pub": str(agent_key.public),
        "priv": str(agent_key.private),
        "junk": str(junk),
    }
    code, _, err = run_cli(capsys, *(arg.format(**names) for arg in argv))
    assert code == ExitCode.CONFIG
    assert err.startswith("backhaul-certs: error: ")
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["revoke", "--list", "rl", "--serial", "x"],
        ["revoke", "--list", "rl"],
        ["revoke", "--list", "rl", "--serial", "1", "--key-id", "a"],
        ["frobnicate"],
        [],
    ],
)
def test_cli_usage_errors_exit_with_config_code(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == ExitCode.CONFIG
    assert "usage:" in err
    assert "Traceback" not in err


def test_cli_ctrl_c_is_one_line_and_a_failure_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ca, "generate_key_pair", interrupted)
    code, _, err = run_cli(capsys, "agent-key", "--name", "db1", "--dir", str(tmp_path))
    assert code == ExitCode.FAILED
    assert err == "backhaul-certs: interrupted\n"
