"""Who is on the other end of an SSH connection: agent identities and host trust.

Collector side, :class:`AgentAuthenticator` decides which agent a connection belongs to.
An agent proves its identity with either

* a public key listed for it in the collector's configuration, or
* a user certificate signed by the Backhaul SSH CA whose principals include its name.

In both cases the SSH username must be the agent's name. Keys and certificates named in
the revocation list (:mod:`common.revocation`) are refused, and so are expired or
not-yet-valid certificates and certificates without principals.

How certificate revocation is enforced with asyncssh: asyncssh hands
``SSHServer.validate_ca_key`` only the signing key, never the certificate, so its serial,
key id and subject key cannot be checked there. :meth:`AgentAuthenticator.attach` wraps
the connection's ``validate_public_key`` coroutine, which every public-key request goes
through with the raw key blob; the wrapper decodes certificates and applies the whole
policy before asyncssh's own checks run. The certificate it vetted is kept in a context
variable for the rest of that request, and :meth:`AgentAuthenticator.validate_ca_key`
refuses any certificate the wrapper did not vet, so a server that forgets ``attach``
refuses every certificate instead of ignoring the revocation list.
:meth:`AgentAuthenticator.agent_for` checks the list again, so a connection opened before
a revocation cannot start new work after it.

Agent side, :func:`known_hosts_for` builds the host trust ``asyncssh.connect`` takes.
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import ipaddress
import logging
import re
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Literal

import asyncssh
from asyncssh.public_key import decode_ssh_certificate, decode_ssh_public_key

from common.certificates import CertificateInfo, format_time
from common.errors import ConfigError, TransportError
from common.revocation import RevocationSource

logger = logging.getLogger(__name__)

_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_agent_name(name: str) -> bool:
    """Return whether ``name`` may name an agent (and so a folder on the collector)."""
    return _AGENT_NAME.fullmatch(name) is not None


# --- collector side -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AgentIdentity:
    """The agent a connection authenticated as, and with what."""

    name: str
    method: Literal["key", "certificate"]
    key_fingerprint: str
    certificate: CertificateInfo | None = None


_ValidateKey = Callable[[str, bytes, bytes, bytes], Awaitable[bool]]

# The certificate the attach() wrapper vetted for the public-key request in progress.
_vetted: contextvars.ContextVar[CertificateInfo | None] = contextvars.ContextVar(
    "backhaul_vetted_certificate", default=None
)


class AgentAuthenticator:
    """Authentication policy an ``asyncssh.SSHServer`` subclass delegates to.

    Call :meth:`attach` from ``connection_made``, return :meth:`begin_auth`,
    :meth:`public_key_auth_supported`, :meth:`validate_public_key` and
    :meth:`validate_ca_key` from the hooks of the same names, and leave asyncssh's
    ``authorized_client_keys`` unset (it would bypass this policy). Use
    :meth:`agent_for` to learn which agent a connection is.
    """

    def __init__(
        self,
        agents: Mapping[str, Path],
        ca_public_key: Path | None,
        revocation_list: Path | None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Load the keys; raises ConfigError for bad names, unreadable or duplicate keys."""
        self._clock = clock
        self._agent_keys: dict[str, bytes] = {}
        owners: dict[bytes, str] = {}
        for name, path in agents.items():
            if not is_valid_agent_name(name):
                raise ConfigError(f"agent name {name!r} is not allowed ([A-Za-z0-9._-])")
            key = load_public_key(path, f"public key of agent {name!r}")
            if key.public_data in owners:
                raise ConfigError(f"{path}: same key as agent {owners[key.public_data]!r}")
            owners[key.public_data] = name
            self._agent_keys[name] = key.public_data
        self._ca_key: bytes | None = None
        self._ca_fingerprint: str | None = None
        if ca_public_key is not None:
            ca_key = load_public_key(ca_public_key, "CA public key")
            self._ca_key, self._ca_fingerprint = ca_key.public_data, key_fp(ca_key)
        # No agent yet is a fresh install's normal state: the collector runs, admits no
        # one, and takes up agents enrolled later on reload (collector.serve.reload).
        self.admits_nobody = not self._agent_keys and self._ca_key is None
        self._revocations = RevocationSource(revocation_list)
        self._identities: weakref.WeakKeyDictionary[asyncssh.SSHServerConnection, AgentIdentity] = (
            weakref.WeakKeyDictionary()
        )

    def attach(self, conn: asyncssh.SSHServerConnection) -> None:
        """Put this policy in front of every public-key request on ``conn``."""
        original: _ValidateKey = conn.validate_public_key

        peer = conn.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"

        async def validate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            identity = self._vet(username, key_data, where)
            if identity is None:
                return False
            token = _vetted.set(identity.certificate)
            try:
                accepted = await original(username, key_data, msg, signature)
            finally:
                _vetted.reset(token)
            if accepted and msg:
                self._identities[conn] = identity
                logger.info("agent %s authenticated by %s", username, _describe(identity))
            return accepted

        # asyncssh has no hook that sees the certificate; see the module docstring.
        conn.validate_public_key = validate  # type: ignore[method-assign]

    def begin_auth(self, username: str) -> bool:
        """Always require authentication (returning False would let anyone in)."""
        logger.debug("authentication begins for %r", username)
        return True

    def public_key_auth_supported(self) -> bool:
        """Public keys and certificates are the only way in."""
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Accept ``key`` only if it is listed for agent ``username`` and not revoked."""
        revocations = self._revocations.current()
        if revocations is None or self._agent_keys.get(username) != key.public_data:
            return False
        if revocations.revokes_key(key.get_fingerprint("sha256"), self._clock()):
            logger.warning("agent %s refused: key is revoked", username)
            return False
        return True

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Accept the Backhaul CA, and only for a certificate :meth:`attach` vetted."""
        vetted = _vetted.get()
        if vetted is None:
            logger.error("certificate for %r refused: attach() was not called", username)
            return False
        return (
            self._ca_key is not None
            and key.public_data == self._ca_key
            and vetted.ca_fingerprint == key.get_fingerprint("sha256")
            and username in vetted.principals
        )

    def agent_for(self, username: str, conn: asyncssh.SSHServerConnection) -> AgentIdentity:
        """Return the agent ``conn`` authenticated as, checking it is still allowed.

        Raises TransportError if the connection did not authenticate through this
        policy as ``username``, or if its key or certificate has since been revoked
        or has expired.
        """
        identity = self._identities.get(conn)
        if identity is None or identity.name != username:
            raise TransportError(f"connection is not authenticated as agent {username!r}")
        problem = self._problem(identity)
        if problem:
            raise TransportError(f"agent {username}: {problem}")
        return identity

    def _vet(self, username: str, key_data: bytes, peer: str = "?") -> AgentIdentity | None:
        """Apply the whole policy to one offered key or certificate."""
        if not is_valid_agent_name(username):
            logger.warning("refused login from %s: %r is not a valid agent name", peer,
                           username[:64])
            return None
        try:
            identity, problem = self._identify(username, key_data)
        except (asyncssh.KeyImportError, ValueError) as exc:
            identity, problem = None, f"unusable key or certificate: {exc}"
        if identity is not None and not problem:
            problem = self._problem(identity)
        if problem:
            logger.warning("refused login as agent %s from %s: %s", username, peer, problem)
            return None
        return identity

    def _identify(self, username: str, key_data: bytes) -> tuple[AgentIdentity | None, str]:
        try:
            cert = decode_ssh_certificate(key_data)
        except asyncssh.KeyImportError:
            key = decode_ssh_public_key(key_data)
            identity = AgentIdentity(username, "key", key_fp(key))
            if self._agent_keys.get(username) != key.public_data:
                return identity, f"key {identity.key_fingerprint} is not listed for it"
            return identity, ""
        info = CertificateInfo.from_certificate(cert)
        identity = AgentIdentity(username, "certificate", info.key_fingerprint, info)
        return identity, self._certificate_problem(username, info)

    def _certificate_problem(self, username: str, info: CertificateInfo) -> str:
        if info.kind != "user":
            return "certificate is not a user certificate"
        if self._ca_fingerprint is None:
            return "no CA is trusted"
        if info.ca_fingerprint != self._ca_fingerprint:
            return f"certificate is signed by {info.ca_fingerprint}, not by the Backhaul CA"
        if username not in info.principals:
            return f"certificate principals {list(info.principals)} do not name it"
        return ""

    def _problem(self, identity: AgentIdentity) -> str:
        """Say why ``identity`` is not acceptable now, or return ''."""
        revocations = self._revocations.current()
        if revocations is None:
            return "revocation list unreadable"
        now = self._clock()
        info = identity.certificate
        if info is None:
            revoked = revocations.revokes_key(identity.key_fingerprint, now)
            return f"key {identity.key_fingerprint} is revoked" if revoked else ""
        if not info.is_current(now):
            return f"certificate serial {info.serial} is outside its validity {_window(info)}"
        if revocations.revokes_certificate(info, now):
            return f"certificate serial {info.serial} (key id {info.key_id}) is revoked"
        return ""


def _describe(identity: AgentIdentity) -> str:
    info = identity.certificate
    if info is None:
        return f"listed key {identity.key_fingerprint}"
    return f"certificate serial {info.serial} key id {info.key_id} ({identity.key_fingerprint})"


def _window(info: CertificateInfo) -> str:
    return f"{format_time(info.valid_after)} .. {format_time(info.valid_before)}"


def key_fp(key: asyncssh.SSHKey) -> str:
    """Return the ``SHA256:…`` fingerprint revocation entries use."""
    return key.get_fingerprint("sha256")


def load_public_key(path: Path, what: str) -> asyncssh.SSHKey:
    """Read an OpenSSH public key file; raises ConfigError naming ``what`` and ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not an OpenSSH public key ({what})") from None
    if "PRIVATE KEY" in text:
        raise ConfigError(f"{path} is a private key; give the {what} (.pub) instead")
    first_word = text.split(maxsplit=1)[0] if text.strip() else ""
    if first_word.endswith("-cert-v01@openssh.com"):
        raise ConfigError(f"{path} is a certificate, not a public key ({what})")
    try:
        return asyncssh.import_public_key(text)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"{path} is not an OpenSSH public key ({what}): {exc}") from None


# --- agent side -----------------------------------------------------------------------

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def known_hosts_for(
    host: str, port: int, pinned_host_key: Path | None, ca_public_key: Path | None
) -> asyncssh.SSHKnownHosts:
    """Return the ``known_hosts`` argument for ``asyncssh.connect(host, port, ...)``.

    The collector is trusted if it shows ``pinned_host_key`` or a host certificate
    for ``host`` signed by the CA in ``ca_public_key``; any other key, a certificate
    from another CA or for another name is refused. The trust applies to this host
    and port only. Also pass ``x509_trusted_certs=None`` to ``connect`` so no system
    X.509 bundle is consulted. Raises ConfigError if neither file is given, a file is
    not a public key, or ``host`` is not a host name or IP address.
    """
    if pinned_host_key is None and ca_public_key is None:
        raise ConfigError("collector host key: give a pinned host key or the CA public key")
    if not 0 < port < 65536:
        raise ConfigError(f"collector port {port} is out of range")
    pattern = _host_pattern(host, port)
    lines = []
    if pinned_host_key is not None:
        key = load_public_key(pinned_host_key, "collector host key")
        lines.append(f"{pattern} {_key_text(key)}")
    if ca_public_key is not None:
        ca_key = load_public_key(ca_public_key, "CA public key")
        lines.append(f"@cert-authority {pattern} {_key_text(ca_key)}")
    return asyncssh.import_known_hosts("\n".join(lines) + "\n")


def _host_pattern(host: str, port: int) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise ConfigError(f"collector host {host!r} is not a host name or address") from None
    return host if port == 22 else f"[{host}]:{port}"


def _key_text(key: asyncssh.SSHKey) -> str:
    return f"{key.get_algorithm()} {base64.b64encode(key.public_data).decode('ascii')}"
