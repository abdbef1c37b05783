"""The Backhaul SSH certificate authority: keys, certificates, rotation and revocation.

A CA directory holds ``ca_key`` (the signing key, mode 0600), ``ca_key.pub`` (what the
collector and agents trust) and ``serial`` (the last serial number issued). Every file
is written to a private temporary name and moved into place, so no reader ever sees a
half-written key and a private key is never readable by others, not even briefly.

Every user-facing mistake (a missing or malformed file, an output that already exists,
a bad name or duration) raises :class:`common.errors.ConfigError` with a message that
names the file or value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncssh

from common.certificates import CertificateInfo, format_time
from common.credentials import check_secret_mode
from common.errors import ConfigError
from common.identity import is_valid_agent_name, key_fp, load_public_key
from common.revocation import RevocationEntry, RevocationList

CA_KEY = "ca_key"
CA_PUBLIC_KEY = "ca_key.pub"
SERIAL_FILE = "serial"
DEFAULT_VALIDITY = "+52w"
DEFAULT_GRACE = "+7d"
CLOCK_SKEW = 300  # seconds a new certificate is back-dated, for hosts whose clocks lag

_DURATION = re.compile(r"\+?((?:\d+[smhdw])+)")
_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MAX_DURATION = 100 * 365 * 86400
_HOST_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,253}")
_REVOCATION_HEADER = """\
# Backhaul revocation list, read by the collector whenever it changes.
# One entry per line; '#' starts a comment:
#   key SHA256:<base64>   a public key (agent key, certificate key or CA key)
#   serial <number>       certificates with this serial number
#   key-id <id>           certificates with this key id
# An entry ending in 'from yyyy-mm-ddThh:mm:ssZ' applies from that UTC time on.
"""


@dataclasses.dataclass(frozen=True)
class KeyPairFiles:
    """Where a generated key pair was written."""

    private: Path
    public: Path


@dataclasses.dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA signed, and where it was written."""

    path: Path
    info: CertificateInfo


@dataclasses.dataclass(frozen=True)
class Rotation:
    """The outcome of :func:`rotate_agent`."""

    key: KeyPairFiles
    certificate: IssuedCertificate
    archived: Path
    revoked: tuple[RevocationEntry, ...]


def parse_duration(text: str) -> int:
    """Parse ``+52w``, ``7d``, ``1w2d12h`` into seconds; raises ConfigError."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"bad duration {text!r}: use e.g. +52w, +30d, +12h")
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(match.group(1)))
    if not 0 < seconds <= _MAX_DURATION:
        raise ConfigError(f"bad duration {text!r}: must be more than 0 and at most 100 years")
    return seconds


def certificate_path_for(public_key: Path) -> Path:
    """``x.pub`` -> ``x-cert.pub``, the name OpenSSH and asyncssh look for."""
    stem = public_key.name.removesuffix(".pub")
    return public_key.with_name(f"{stem}-cert.pub")


class CertificateAuthority:
    """A CA directory and its signing key."""

    def __init__(self, directory: Path, key: asyncssh.SSHKey) -> None:
        self.directory = directory
        self._key = key

    @property
    def public_key_path(self) -> Path:
        """The file the collector and agents are told to trust."""
        return self.directory / CA_PUBLIC_KEY

    @property
    def fingerprint(self) -> str:
        """The CA key's SHA256 fingerprint."""
        return key_fp(self._key)

    @classmethod
    def create(cls, directory: Path, *, force: bool = False) -> CertificateAuthority:
        """Generate a new CA in ``directory``; refuses to replace one unless ``force``."""
        key = asyncssh.generate_private_key("ssh-ed25519", comment="backhaul-ca")
        for name in (CA_KEY, CA_PUBLIC_KEY):
            _refuse_existing(directory / name, force)
        write_private_file(directory / CA_KEY, key.export_private_key("openssh"), force=force)
        write_public_file(directory / CA_PUBLIC_KEY, key.export_public_key(), force=force)
        if not (directory / SERIAL_FILE).exists():
            # A replaced CA keeps counting, so old "serial" revocations never hit new certs.
            write_public_file(directory / SERIAL_FILE, b"0\n", mode=0o600)
        return cls(directory, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Open the CA in ``directory``; raises ConfigError if it is missing or unsafe."""
        path = directory / CA_KEY
        try:
            info = path.stat()
            key = asyncssh.read_private_key(path)
        except FileNotFoundError:
            raise ConfigError(f"no CA in {directory}: {path} is missing (run init-ca)") from None
        except (OSError, asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"cannot read CA key {path}: {exc}") from None
        check_secret_mode(info, path, "CA key", service_group=False)
        return cls(directory, key)

    def issue_agent(
        self,
        name: str,
        public_key: Path,
        *,
        validity: str = DEFAULT_VALIDITY,
        output: Path | None = None,
        force: bool = False,
        now: float | None = None,
    ) -> IssuedCertificate:
        """Sign a user certificate whose only principal is agent ``name``.

        Written to ``output`` or beside the public key as ``<name>-cert.pub``.
        """
        if not is_valid_agent_name(name):
            raise ConfigError(f"agent name {name!r} is not allowed: use letters, digits, . _ -")
        subject = load_public_key(public_key, f"public key of agent {name!r}")
        return self._issue("agent", [name], subject, public_key, validity, output, force, now)

    def issue_host(
        self,
        hostnames: Sequence[str],
        public_key: Path,
        *,
        validity: str = DEFAULT_VALIDITY,
        output: Path | None = None,
        force: bool = False,
        now: float | None = None,
    ) -> IssuedCertificate:
        """Sign a host certificate for the collector, valid for each of ``hostnames``."""
        if not hostnames:
            raise ConfigError("a host certificate needs at least one host name")
        for host in hostnames:
            if not _HOST_NAME.fullmatch(host):
                raise ConfigError(f"host name {host!r} is not a plain host name or address")
        subject = load_public_key(public_key, "collector host key")
        return self._issue("host", hostnames, subject, public_key, validity, output, force, now)

    def _issue(
        self,
        kind: str,
        principals: Sequence[str],
        subject: asyncssh.SSHKey,
        public_key: Path,
        validity: str,
        output: Path | None,
        force: bool,
        now: float | None,
    ) -> IssuedCertificate:
        lifetime = parse_duration(validity)
        start = int(time.time() if now is None else now)
        path = output or certificate_path_for(public_key)
        _refuse_existing(path, force)
        serial = self._next_serial()
        key_id = f"{kind}:{principals[0]}:{serial}"
        after, before = start - CLOCK_SKEW, start + lifetime
        comment = f"backhaul-{kind}:{principals[0]}"
        if kind == "agent":
            cert = self._key.generate_user_certificate(
                subject,
                key_id,
                serial=serial,
                principals=list(principals),
                valid_after=after,
                valid_before=before,
                permit_x11_forwarding=False,
                permit_agent_forwarding=False,
                permit_port_forwarding=False,
                permit_pty=False,
                permit_user_rc=False,
                comment=comment,
            )
        else:
            cert = self._key.generate_host_certificate(
                subject,
                key_id,
                serial=serial,
                principals=list(principals),
                valid_after=after,
                valid_before=before,
                comment=comment,
            )
        write_public_file(path, cert.export_certificate(), force=force)
        return IssuedCertificate(path, CertificateInfo.from_certificate(cert))

    def _next_serial(self) -> int:
        """Allocate the next serial number; the file lock keeps two issuers apart."""
        path = self.directory / SERIAL_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open serial file {path}: {exc}") from None
        with os.fdopen(fd, "r+", encoding="ascii") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            text = file.read().strip() or "0"
            if not text.isdigit():
                raise ConfigError(f"serial file {path} is corrupt: {text[:20]!r}")
            serial = int(text) + 1
            file.seek(0)
            file.truncate()
            file.write(f"{serial}\n")
            file.flush()
            os.fsync(file.fileno())
        return serial


def generate_key_pair(
    directory: Path, name: str, *, comment: str, force: bool = False
) -> KeyPairFiles:
    """Write a new ed25519 key pair as ``directory/name`` (0600) and ``name.pub``."""
    if not is_valid_agent_name(name):
        raise ConfigError(f"key name {name!r} is not allowed: use letters, digits, . _ -")
    files = KeyPairFiles(directory / name, directory / f"{name}.pub")
    for path in (files.private, files.public, certificate_path_for(files.public)):
        _refuse_existing(path, force)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
    write_private_file(files.private, key.export_private_key("openssh"), force=force)
    write_public_file(files.public, key.export_public_key(), force=force)
    if force:
        certificate_path_for(files.public).unlink(missing_ok=True)  # it certified the old key
    return files


def read_certificate(path: Path) -> CertificateInfo:
    """Read an OpenSSH certificate file; raises ConfigError if it is not one."""
    try:
        cert = asyncssh.read_certificate(path)
        return CertificateInfo.from_certificate(cert)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise ConfigError(f"{path} is not an OpenSSH certificate: {exc}") from None


def key_fingerprint_of(value: str) -> str:
    """Return the fingerprint named by ``value``: ``SHA256:…``, a .pub or a certificate."""
    if value.startswith("SHA256:"):
        try:
            return RevocationEntry("key", value).value
        except ValueError:
            raise ConfigError(f"{value!r} is not a SHA256 key fingerprint") from None
    path = Path(value)
    try:
        return key_fp(load_public_key(path, "key to revoke"))
    except ConfigError:
        if path.is_file() and b"-cert-v01@openssh.com" in path.read_bytes()[:64]:
            return read_certificate(path).key_fingerprint
        raise


def load_revocation_list(path: Path) -> RevocationList:
    """Read a revocation list; a missing file is an empty list."""
    if not path.exists():
        return RevocationList()
    return RevocationList.load(path)


def append_revocations(path: Path, entries: Sequence[RevocationEntry], comment: str = "") -> None:
    """Append ``entries`` to the revocation list at ``path``, creating it if needed.

    The existing list must parse (the collector refuses everyone while it does not).
    Entries go out in one append so the collector never reads half an entry.
    """
    load_revocation_list(path)
    note = " ".join(comment.split())
    lines = "".join(f"{e.format()}{'  # ' + note if note else ''}\n" for e in entries)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write revocation list {path}: {exc}") from None
    with os.fdopen(fd, "a", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        header = _REVOCATION_HEADER if os.fstat(fd).st_size == 0 else ""
        file.write(header + lines)
        file.flush()
        os.fsync(fd)


def rotate_agent(
    ca: CertificateAuthority,
    name: str,
    key_dir: Path,
    revocation_list: Path,
    *,
    grace: str = DEFAULT_GRACE,
    validity: str = DEFAULT_VALIDITY,
    now: float | None = None,
) -> Rotation:
    """Replace agent ``name``'s key and certificate in ``key_dir``.

    The old files move to ``key_dir/retired/<name>-<time>/``; the old key (and the old
    certificate's serial) are appended to the revocation list, effective after
    ``grace`` so the agent can switch to the new files first.
    """
    start = time.time() if now is None else now
    effective = int(start) + parse_duration(grace)
    old = KeyPairFiles(key_dir / name, key_dir / f"{name}.pub")
    old_cert = certificate_path_for(old.public)
    entries = [RevocationEntry("key", key_fp(load_public_key(old.public, "current agent key")))]
    if old_cert.exists():
        entries.append(RevocationEntry("serial", str(read_certificate(old_cert).serial)))
    revoked = tuple(dataclasses.replace(e, effective=effective) for e in entries)
    load_revocation_list(revocation_list)
    stamp = format_time(int(start)).replace(":", "").replace("-", "")
    archived = key_dir / "retired" / f"{name}-{stamp}"
    with _converted_os_errors(f"cannot archive the old key of {name} to {archived}"):
        archived.parent.mkdir(mode=0o700, exist_ok=True)
        archived.mkdir(mode=0o700)
        for path in (old.private, old.public, old_cert):
            if path.exists():
                path.rename(archived / path.name)
    files = generate_key_pair(key_dir, name, comment=f"backhaul-agent:{name}")
    cert = ca.issue_agent(name, files.public, validity=validity, now=start)
    append_revocations(revocation_list, revoked, comment=f"rotated agent {name}")
    return Rotation(files, cert, archived, revoked)


def write_private_file(path: Path, data: bytes, *, force: bool = False) -> None:
    """Write a secret: created 0600 under a temporary name, then moved into place."""
    _write_file(path, data, mode=0o600, force=force)


def write_public_file(path: Path, data: bytes, *, force: bool = False, mode: int = 0o644) -> None:
    """Write a non-secret file atomically (readable by all by default)."""
    _write_file(path, data, mode=mode, force=force)


def _write_file(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    _refuse_existing(path, force)
    with _converted_os_errors(f"cannot write {path}"):
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, mode)
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), mode)  # the umask may have narrowed it
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if force:
                temporary.replace(path)
            else:
                os.link(temporary, path)  # fails, rather than replaces, if path appeared
        finally:
            temporary.unlink(missing_ok=True)


def _refuse_existing(path: Path, force: bool) -> None:
    if not force and (path.exists() or path.is_symlink()):
        raise ConfigError(f"{path} already exists; use --force to overwrite it")


@contextlib.contextmanager
def _converted_os_errors(what: str) -> Iterator[None]:
    try:
        yield
    except FileExistsError as exc:
        raise ConfigError(f"{what}: {exc.filename} already exists") from None
    except OSError as exc:
        raise ConfigError(f"{what}: {exc.strerror or exc}") from None
