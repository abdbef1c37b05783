"""OpenSSH certificate fields asyncssh keeps private, and the time format they print in.

asyncssh checks a certificate's signature but exposes neither its serial, type, key id
nor validity window, and revocation and ``backhaul-certs show`` need all of them.
:class:`CertificateInfo` reads them from the certificate's wire form. This is a pure
codec with no I/O, so the collector's policy, the revocation list and the CA tooling
share one reading of a certificate.
"""

from __future__ import annotations

import dataclasses
import datetime
import struct
from collections.abc import Iterable
from typing import Literal

import asyncssh
from asyncssh.public_key import SSHOpenSSHCertificate

USER_CERT = 1
HOST_CERT = 2

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_YEAR_10000 = 253_402_300_800


def format_time(timestamp: int) -> str:
    """Format epoch seconds the way the revocation list and ``show`` print them.

    Times past the year 9999 (``ssh-keygen -V always:forever`` uses 2**64 - 1) print
    as ``forever``.
    """
    if timestamp >= _YEAR_10000:
        return "forever"
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime(_TIME_FORMAT)


def parse_time(text: str) -> int:
    """Parse ``yyyy-mm-ddThh:mm:ssZ``; raises ValueError."""
    moment = datetime.datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=datetime.UTC)
    return int(moment.timestamp())


@dataclasses.dataclass(frozen=True)
class CertificateInfo:
    """The fields of an OpenSSH certificate that policy and people care about."""

    kind: Literal["user", "host"]
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    key_fingerprint: str
    ca_fingerprint: str

    @classmethod
    def from_certificate(cls, cert: asyncssh.SSHCertificate) -> CertificateInfo:
        """Read a certificate asyncssh has decoded (and whose signature it checked).

        asyncssh keeps serial, type, key id and validity private, so they are read from
        the certificate's wire form (OpenSSH PROTOCOL.certkeys). The key-specific fields
        in the middle are exactly the subject key's own wire fields, which is how they
        are skipped for any key type. Raises ValueError for X.509 or malformed data.
        """
        if not isinstance(cert, SSHOpenSSHCertificate):
            raise ValueError("not an OpenSSH certificate")
        data = cert.public_data
        try:
            offset = _skip_string(data, _skip_string(data, 0))  # algorithm, nonce
            key_data = cert.key.public_data
            offset += len(key_data) - _skip_string(key_data, 0)
            serial, cert_type = struct.unpack_from(">QI", data, offset)
            key_id, offset = _read_string(data, offset + 12)
            packed_principals, offset = _read_string(data, offset)
            valid_after, valid_before = struct.unpack_from(">QQ", data, offset)
            offset += 16
            for _ in range(3):  # critical options, extensions, reserved
                offset = _skip_string(data, offset)
            signing_key, offset = _read_string(data, offset)
        except struct.error:
            raise ValueError("truncated certificate") from None
        principals = tuple(_unpack_strings(packed_principals))
        if signing_key != cert.signing_key.public_data or principals != tuple(cert.principals):
            raise ValueError("certificate fields do not match its decoded form")
        if cert_type not in (USER_CERT, HOST_CERT):
            raise ValueError(f"unknown certificate type {cert_type}")
        return cls(
            kind="user" if cert_type == USER_CERT else "host",
            key_id=key_id.decode("utf-8"),
            serial=serial,
            principals=principals,
            valid_after=valid_after,
            valid_before=valid_before,
            key_fingerprint=cert.key.get_fingerprint("sha256"),
            ca_fingerprint=cert.signing_key.get_fingerprint("sha256"),
        )

    def is_current(self, now: float) -> bool:
        """Return whether ``now`` lies inside the validity window."""
        return self.valid_after <= now < self.valid_before


def _read_string(data: bytes, offset: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from(">I", data, offset)
    end = offset + 4 + length
    if end > len(data):
        raise ValueError("truncated certificate")
    return data[offset + 4 : end], end


def _skip_string(data: bytes, offset: int) -> int:
    return _read_string(data, offset)[1]


def _unpack_strings(data: bytes) -> Iterable[str]:
    offset = 0
    while offset < len(data):
        value, offset = _read_string(data, offset)
        yield value.decode("utf-8")
