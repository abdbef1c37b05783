"""Agent and collector identity checks against real asyncssh servers and clients."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import asyncssh
import pytest

from certs import ca
from common.errors import TransportError
from common.identity import AgentAuthenticator, key_fp, known_hosts_for
from common.revocation import RevocationEntry

pytestmark = pytest.mark.integration

_KeySpec = asyncssh.SSHKey | tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]


class _EchoSession(asyncssh.SSHServerSession[str]):
    """Offers only the ``backhaul`` subsystem and answers with the agent's name."""

    def __init__(self, auth: AgentAuthenticator, conn: asyncssh.SSHServerConnection) -> None:
        self._auth = auth
        self._conn = conn
        self._chan: asyncssh.SSHServerChannel[str] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:
        self._chan = chan

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "backhaul"

    def session_started(self) -> None:
        assert self._chan is not None
        try:
            identity = self._auth.agent_for(self._conn.get_extra_info("username"), self._conn)
        except TransportError as exc:
            self._chan.write_stderr(f"{exc}\n")
            self._chan.exit(1)
            return
        self._chan.write(f"{identity.name} {identity.method}\n")
        self._chan.exit(0)


class _Collector(asyncssh.SSHServer):
    """A minimal collector: authentication entirely delegated to AgentAuthenticator."""

    def __init__(self, auth: AgentAuthenticator, attach: bool = True) -> None:
        self._auth = auth
        self._attach = attach
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        if self._attach:
            self._auth.attach(conn)

    def begin_auth(self, username: str) -> bool:
        return self._auth.begin_auth(username)

    def public_key_auth_supported(self) -> bool:
        return self._auth.public_key_auth_supported()

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._auth.validate_public_key(username, key)

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._auth.validate_ca_key(username, key)

    def session_requested(self) -> _EchoSession:
        assert self._conn is not None
        return _EchoSession(self._auth, self._conn)


@dataclasses.dataclass
class Pki:
    """A CA, a foreign CA, the collector's host key and a revocation list, on disk."""

    root: Path
    authority: ca.CertificateAuthority
    other_ca: ca.CertificateAuthority
    host: ca.KeyPairFiles
    revocations: Path

    def agent_key(self, name: str) -> ca.KeyPairFiles:
        return ca.generate_key_pair(self.root / "agents", name, comment=f"test:{name}")

    def agent_cert(
        self,
        name: str,
        *,
        authority: ca.CertificateAuthority | None = None,
        validity: str = ca.DEFAULT_VALIDITY,
        now: float | None = None,
    ) -> tuple[ca.KeyPairFiles, ca.IssuedCertificate]:
        files = self.agent_key(name)
        issued = (authority or self.authority).issue_agent(
            name, files.public, validity=validity, now=now
        )
        return files, issued

    def revoke(self, *entries: RevocationEntry) -> None:
        ca.append_revocations(self.revocations, entries)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    revocations = tmp_path / "revoked.txt"
    revocations.write_text("# nothing revoked yet\n")
    return Pki(
        root=tmp_path,
        authority=ca.CertificateAuthority.create(tmp_path / "ca"),
        other_ca=ca.CertificateAuthority.create(tmp_path / "other-ca"),
        host=ca.generate_key_pair(tmp_path / "collector", "host", comment="collector"),
        revocations=revocations,
    )


StartCollector = Callable[..., Awaitable[int]]


@pytest.fixture
async def start_collector() -> AsyncIterator[StartCollector]:
    """Start collectors on 127.0.0.1 port 0; returns the port. Closed at teardown."""
    servers: list[asyncssh.SSHAcceptor] = []

    async def start(
        auth: AgentAuthenticator,
        host_key: Path | tuple[Path, Path],
        *,
        attach: bool = True,
    ) -> int:
        keys = (
            [(str(host_key[0]), str(host_key[1]))]
            if isinstance(host_key, tuple)
            else [str(host_key)]
        )
        server = await asyncssh.create_server(
            lambda: _Collector(auth, attach),
            "127.0.0.1",
            0,
            server_host_keys=keys,
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
        )
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def run_agent(
    port: int,
    username: str,
    key: Path | _KeySpec | tuple[Path, Path],
    known_hosts: asyncssh.SSHKnownHosts,
) -> str:
    """Connect as an agent, open the ``backhaul`` subsystem, return what it says."""
    if isinstance(key, Path):
        spec: object = asyncssh.read_private_key(key)
    elif isinstance(key, tuple) and isinstance(key[0], Path):
        spec = (str(key[0]), str(key[1]))
    else:
        spec = key
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        username=username,
        client_keys=[spec],
        known_hosts=known_hosts,
        x509_trusted_certs=None,
        agent_path=None,
        config=None,
        preferred_auth="publickey",
        connect_timeout=10,
    ) as conn:
        result = await conn.run(subsystem="backhaul", check=True)
    assert isinstance(result.stdout, str)
    return result.stdout.strip()


def authenticator(
    pki: Pki, agents: Mapping[str, Path] | None = None, *, with_ca: bool = True
) -> AgentAuthenticator:
    return AgentAuthenticator(
        agents or {}, pki.authority.public_key_path if with_ca else None, pki.revocations
    )


def pinned(pki: Pki, port: int) -> asyncssh.SSHKnownHosts:
    return known_hosts_for("127.0.0.1", port, pki.host.public, None)


async def expect_refused(attempt: Awaitable[str]) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        await attempt


# --- listed keys ----------------------------------------------------------------------


async def test_listed_key_is_accepted(pki: Pki, start_collector: StartCollector) -> None:
    db1 = pki.agent_key("db1")
    port = await start_collector(authenticator(pki, {"db1": db1.public}), pki.host.private)
    assert await run_agent(port, "db1", db1.private, pinned(pki, port)) == "db1 key"


async def test_listed_key_refused_for_another_agents_username(
    pki: Pki, start_collector: StartCollector
) -> None:
    db1, db2 = pki.agent_key("db1"), pki.agent_key("db2")
    auth = authenticator(pki, {"db1": db1.public, "db2": db2.public})
    port = await start_collector(auth, pki.host.private)
    await expect_refused(run_agent(port, "db2", db1.private, pinned(pki, port)))


async def test_unknown_key_is_refused(pki: Pki, start_collector: StartCollector) -> None:
    db1, stranger = pki.agent_key("db1"), pki.agent_key("stranger")
    port = await start_collector(authenticator(pki, {"db1": db1.public}), pki.host.private)
    await expect_refused(run_agent(port, "db1", stranger.private, pinned(pki, port)))
    await expect_refused(run_agent(port, "stranger", stranger.private, pinned(pki, port)))


async def test_revoked_listed_key_is_refused(pki: Pki, start_collector: StartCollector) -> None:
    db1 = pki.agent_key("db1")
    port = await start_collector(authenticator(pki, {"db1": db1.public}), pki.host.private)
    assert await run_agent(port, "db1", db1.private, pinned(pki, port)) == "db1 key"
    pki.revoke(RevocationEntry("key", key_fp(asyncssh.read_public_key(db1.public))))
    await expect_refused(run_agent(port, "db1", db1.private, pinned(pki, port)))


# --- user certificates ----------------------------------------------------------------


async def test_certificate_with_agent_principal_is_accepted(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web")
    port = await start_collector(authenticator(pki), pki.host.private)
    answer = await run_agent(port, "web", (web.private, issued.path), pinned(pki, port))
    assert answer == "web certificate"


async def test_certificate_for_another_principal_is_refused(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web")
    port = await start_collector(authenticator(pki), pki.host.private)
    await expect_refused(run_agent(port, "db9", (web.private, issued.path), pinned(pki, port)))


async def test_expired_certificate_is_refused(pki: Pki, start_collector: StartCollector) -> None:
    web, issued = pki.agent_cert("web", validity="+1w", now=time.time() - 30 * 86400)
    port = await start_collector(authenticator(pki), pki.host.private)
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_not_yet_valid_certificate_is_refused(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web", now=time.time() + 86400)
    port = await start_collector(authenticator(pki), pki.host.private)
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_certificate_revoked_by_key_is_refused(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web")
    port = await start_collector(authenticator(pki), pki.host.private)
    assert await run_agent(port, "web", (web.private, issued.path), pinned(pki, port))
    pki.revoke(RevocationEntry("key", issued.info.key_fingerprint))
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_certificate_revoked_by_serial_is_refused(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web")
    _, other = pki.agent_cert("db1")
    port = await start_collector(authenticator(pki), pki.host.private)
    pki.revoke(RevocationEntry("serial", str(other.info.serial)))
    assert await run_agent(port, "web", (web.private, issued.path), pinned(pki, port))
    pki.revoke(RevocationEntry("serial", str(issued.info.serial)))
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_certificate_revoked_by_key_id_is_refused(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web")
    port = await start_collector(authenticator(pki), pki.host.private)
    pki.revoke(RevocationEntry("key-id", issued.info.key_id))
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_revocation_after_grace_period_does_not_apply_yet(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web")
    port = await start_collector(authenticator(pki), pki.host.private)
    later = int(time.time()) + 3600
    pki.revoke(RevocationEntry("serial", str(issued.info.serial), later))
    assert await run_agent(port, "web", (web.private, issued.path), pinned(pki, port))


async def test_everyone_refused_while_revocation_list_is_broken(
    pki: Pki, start_collector: StartCollector
) -> None:
    """A list the collector cannot parse fails closed, and recovers once it is fixed."""
    db1 = pki.agent_key("db1")
    web, issued = pki.agent_cert("web")
    port = await start_collector(authenticator(pki, {"db1": db1.public}), pki.host.private)
    pki.revocations.write_text("serial twelve\n")
    await expect_refused(run_agent(port, "db1", db1.private, pinned(pki, port)))
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))
    pki.revocations.write_text("serial 12\n")
    assert await run_agent(port, "db1", db1.private, pinned(pki, port)) == "db1 key"
    assert await run_agent(port, "web", (web.private, issued.path), pinned(pki, port))


async def test_certificate_from_another_ca_is_refused(
    pki: Pki, start_collector: StartCollector
) -> None:
    web, issued = pki.agent_cert("web", authority=pki.other_ca)
    port = await start_collector(authenticator(pki), pki.host.private)
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_certificate_refused_when_no_ca_is_trusted(
    pki: Pki, start_collector: StartCollector
) -> None:
    db1 = pki.agent_key("db1")
    web, issued = pki.agent_cert("web")
    port = await start_collector(
        authenticator(pki, {"db1": db1.public}, with_ca=False), pki.host.private
    )
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_host_certificate_is_not_a_user_certificate(
    pki: Pki, start_collector: StartCollector
) -> None:
    web = pki.agent_key("web")
    issued = pki.authority.issue_host(["web"], web.public)
    port = await start_collector(authenticator(pki), pki.host.private)
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))


async def test_certificates_refused_when_server_forgets_attach(
    pki: Pki, start_collector: StartCollector
) -> None:
    """Without the certificate check in front, certificates fail closed; keys still work."""
    db1 = pki.agent_key("db1")
    web, issued = pki.agent_cert("web")
    auth = authenticator(pki, {"db1": db1.public})
    port = await start_collector(auth, pki.host.private, attach=False)
    await expect_refused(run_agent(port, "web", (web.private, issued.path), pinned(pki, port)))
    with pytest.raises(asyncssh.ProcessError):  # agent_for knows nothing of the connection
        await run_agent(port, "db1", db1.private, pinned(pki, port))


async def test_open_connection_loses_access_when_revoked(
    pki: Pki, start_collector: StartCollector
) -> None:
    """A revocation reaches connections that authenticated before it."""
    web, issued = pki.agent_cert("web")
    port = await start_collector(authenticator(pki), pki.host.private)
    keys = asyncssh.load_keypairs([(str(web.private), str(issued.path))])
    async with asyncssh.connect(
        "127.0.0.1",
        port,
        username="web",
        client_keys=keys,
        known_hosts=pinned(pki, port),
        agent_path=None,
        config=None,
    ) as conn:
        first = await conn.run(subsystem="backhaul")
        pki.revoke(RevocationEntry("serial", str(issued.info.serial)))
        second = await conn.run(subsystem="backhaul")
    assert (first.exit_status, second.exit_status) == (0, 1)
    assert "revoked" in str(second.stderr)


# --- the collector's host key, seen by the agent -----------------------------------------


async def test_agent_refuses_collector_whose_host_key_changed(
    pki: Pki, start_collector: StartCollector
) -> None:
    db1 = pki.agent_key("db1")
    impostor = ca.generate_key_pair(pki.root / "impostor", "host", comment="impostor")
    port = await start_collector(authenticator(pki, {"db1": db1.public}), impostor.private)
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await run_agent(port, "db1", db1.private, pinned(pki, port))


async def test_agent_accepts_host_certificate_from_ca(
    pki: Pki, start_collector: StartCollector
) -> None:
    db1 = pki.agent_key("db1")
    host_cert = pki.authority.issue_host(["127.0.0.1", "collector.example"], pki.host.public)
    auth = authenticator(pki, {"db1": db1.public})
    port = await start_collector(auth, (pki.host.private, host_cert.path))
    trust = known_hosts_for("127.0.0.1", port, None, pki.authority.public_key_path)
    assert await run_agent(port, "db1", db1.private, trust) == "db1 key"


@pytest.mark.parametrize("problem", ["other CA", "other host name", "expired"])
async def test_agent_refuses_bad_host_certificate(
    pki: Pki, start_collector: StartCollector, problem: str
) -> None:
    db1 = pki.agent_key("db1")
    authority, names, now = pki.authority, ["127.0.0.1"], None
    if problem == "other CA":
        authority = pki.other_ca
    elif problem == "other host name":
        names = ["collector.example"]
    else:
        now = time.time() - 30 * 86400
    host_cert = authority.issue_host(names, pki.host.public, validity="+1w", now=now)
    port = await start_collector(
        authenticator(pki, {"db1": db1.public}), (pki.host.private, host_cert.path)
    )
    trust = known_hosts_for("127.0.0.1", port, None, pki.authority.public_key_path)
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await run_agent(port, "db1", db1.private, trust)


async def test_trust_is_bound_to_host_and_port(pki: Pki, start_collector: StartCollector) -> None:
    db1 = pki.agent_key("db1")
    port = await start_collector(authenticator(pki, {"db1": db1.public}), pki.host.private)
    wrong_port = known_hosts_for(
        "127.0.0.1", port + 1 if port < 65535 else 1, pki.host.public, None
    )
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await run_agent(port, "db1", db1.private, wrong_port)


# --- keys made by OpenSSH's ssh-keygen ------------------------------------------------------

needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="no ssh-keygen")


def ssh_keygen(*args: str) -> None:
    subprocess.run(["ssh-keygen", "-q", *args], check=True, capture_output=True)


@pytest.fixture
def openssh_keys(pki: Pki) -> Sequence[Path]:
    """An agent key and a collector host key made by ``ssh-keygen -t ed25519``."""
    folder = pki.root / "openssh"
    folder.mkdir()
    for name in ("agent", "host"):
        ssh_keygen("-t", "ed25519", "-N", "", "-C", name, "-f", str(folder / name))
    return folder / "agent", folder / "host"


@needs_ssh_keygen
async def test_ssh_keygen_keys_work_as_listed_and_host_keys(
    pki: Pki, start_collector: StartCollector, openssh_keys: Sequence[Path]
) -> None:
    agent, host = openssh_keys
    auth = authenticator(pki, {"db1": agent.with_suffix(".pub")})
    port = await start_collector(auth, host)
    trust = known_hosts_for("127.0.0.1", port, host.with_suffix(".pub"), None)
    assert await run_agent(port, "db1", agent, trust) == "db1 key"


@needs_ssh_keygen
async def test_ssh_keygen_key_certified_by_our_ca_works(
    pki: Pki, start_collector: StartCollector, openssh_keys: Sequence[Path]
) -> None:
    agent, _ = openssh_keys
    issued = pki.authority.issue_agent("web", agent.with_suffix(".pub"))
    port = await start_collector(authenticator(pki), pki.host.private)
    answer = await run_agent(port, "web", (agent, issued.path), pinned(pki, port))
    assert answer == "web certificate"


@needs_ssh_keygen
async def test_ssh_keygen_certificate_serial_is_checked(
    pki: Pki, start_collector: StartCollector, openssh_keys: Sequence[Path]
) -> None:
    """A certificate ssh-keygen signs with our CA key is read and revoked by serial."""
    agent, _ = openssh_keys
    ca_key = pki.authority.directory / ca.CA_KEY
    ssh_keygen("-s", str(ca_key), "-I", "made-by-openssh", "-n", "web", "-z", "4242", "-V", "+1d",
               str(agent.with_suffix(".pub")))  # fmt: skip
    cert = agent.with_name("agent-cert.pub")
    port = await start_collector(authenticator(pki), pki.host.private)
    assert await run_agent(port, "web", (agent, cert), pinned(pki, port)) == "web certificate"
    pki.revoke(RevocationEntry("serial", "4242"))
    await expect_refused(run_agent(port, "web", (agent, cert), pinned(pki, port)))


@needs_ssh_keygen
async def test_certificate_without_principals_is_refused(
    pki: Pki, start_collector: StartCollector, openssh_keys: Sequence[Path]
) -> None:
    """asyncssh alone would accept such a certificate for any user name."""
    agent, _ = openssh_keys
    ssh_keygen("-s", str(pki.authority.directory / ca.CA_KEY), "-I", "no-principals", "-V", "+1d",
               str(agent.with_suffix(".pub")))  # fmt: skip
    cert = agent.with_name("agent-cert.pub")
    port = await start_collector(authenticator(pki), pki.host.private)
    await expect_refused(run_agent(port, "web", (agent, cert), pinned(pki, port)))
