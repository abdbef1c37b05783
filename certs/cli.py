"""``backhaul-certs``: the command line over :mod:`certs.ca`.

Exit codes come from :class:`common.errors.ExitCode`: 0 on success, 2 (CONFIG) for a
mistake in the command line or in a file it names. Mistakes print one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from certs import ca
from common.certificates import format_time
from common.cli import print_error, run_script
from common.errors import BackhaulError, ConfigError, ExitCode
from common.identity import key_fp, load_public_key
from common.revocation import RevocationEntry

PROG = "backhaul-certs"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return the process exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed its usage message already
        return exc.code if isinstance(exc.code, int) else ExitCode.CONFIG
    command: Callable[[argparse.Namespace], None] = args.command
    try:
        command(args)
    except BackhaulError as exc:
        print_error(PROG, f"error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        # Each key or certificate file is written whole or not at all (certs.ca).
        print_error(PROG, "interrupted")
        return ExitCode.FAILED
    return ExitCode.OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Backhaul keys and SSH certificates")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], None], text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(command=handler)
        return sub

    sub = command("init-ca", _init_ca, "create the Backhaul SSH CA in a directory")
    sub.add_argument("--dir", type=Path, required=True, help="CA directory (created 0700)")
    _add_force(sub)

    sub = command("agent-key", _agent_key, "generate an ed25519 key pair for an agent")
    sub.add_argument("--name", required=True, help="agent name; files are NAME and NAME.pub")
    sub.add_argument("--dir", type=Path, required=True, help="directory for the key files")
    _add_force(sub)

    sub = command("host-key", _host_key, "generate an ed25519 host key for the collector")
    sub.add_argument("--dir", type=Path, required=True, help="directory for the key files")
    sub.add_argument(
        "--name", default="ssh_host_ed25519_key", help="file name (default: %(default)s)"
    )
    _add_force(sub)

    sub = command("issue-agent", _issue_agent, "sign an agent's public key (principal = name)")
    sub.add_argument("--ca", type=Path, required=True, help="CA directory")
    sub.add_argument("--name", required=True, help="agent name, the certificate's principal")
    sub.add_argument("--pubkey", type=Path, required=True, help="the agent's public key (.pub)")
    _add_output(sub)

    sub = command("issue-host", _issue_host, "sign the collector's host key")
    sub.add_argument("--ca", type=Path, required=True, help="CA directory")
    sub.add_argument(
        "--hostname",
        action="append",
        required=True,
        help="name agents connect to; repeat for more names or addresses",
    )
    sub.add_argument("--pubkey", type=Path, required=True, help="the collector's host key (.pub)")
    _add_output(sub)

    sub = command("rotate", _rotate, "replace an agent's key and certificate")
    sub.add_argument("--ca", type=Path, required=True, help="CA directory")
    sub.add_argument("--name", required=True, help="agent name")
    sub.add_argument("--dir", type=Path, required=True, help="directory holding NAME and NAME.pub")
    sub.add_argument("--list", type=Path, required=True, help="revocation list file")
    sub.add_argument("--grace", default=ca.DEFAULT_GRACE, help="old key works this long (+7d)")
    sub.add_argument("--validity", default=ca.DEFAULT_VALIDITY, help="new certificate (+52w)")

    sub = command("revoke", _revoke, "add a key or certificate to the revocation list")
    sub.add_argument("--list", type=Path, required=True, help="revocation list file")
    what = sub.add_mutually_exclusive_group(required=True)
    what.add_argument("--key", help="public key or certificate file, or SHA256:… fingerprint")
    what.add_argument("--serial", type=_serial, help="certificate serial number")
    what.add_argument("--key-id", help="certificate key id")
    sub.add_argument("--grace", help="revoke only after this long (e.g. 7d); default: now")
    sub.add_argument("--comment", default="", help="note kept beside the entry")

    sub = command("show", _show, "print a certificate's principals, validity and serial")
    sub.add_argument("file", type=Path, help="certificate (or public key) file")
    return parser


def _add_force(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--force", action="store_true", help="overwrite existing files")


def _add_output(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--validity", default=ca.DEFAULT_VALIDITY, help="lifetime (default +52w)")
    sub.add_argument("--out", type=Path, help="certificate file (default: beside the .pub)")
    _add_force(sub)


def _serial(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) >= 2**64:
        raise argparse.ArgumentTypeError(f"not a certificate serial number: {text!r}")
    return int(text)


def _init_ca(args: argparse.Namespace) -> None:
    authority = ca.CertificateAuthority.create(args.dir, force=args.force)
    print(f"created CA {authority.fingerprint}")
    print(f"  private key: {args.dir / ca.CA_KEY} (keep it secret)")
    print(f"  public key:  {authority.public_key_path} (give it to the collector and agents)")


def _agent_key(args: argparse.Namespace) -> None:
    files = ca.generate_key_pair(
        args.dir, args.name, comment=f"backhaul-agent:{args.name}", force=args.force
    )
    print(f"wrote {files.private} and {files.public}")


def _host_key(args: argparse.Namespace) -> None:
    files = ca.generate_key_pair(
        args.dir, args.name, comment="backhaul-collector", force=args.force
    )
    print(f"wrote {files.private} and {files.public}")


def _issue_agent(args: argparse.Namespace) -> None:
    authority = ca.CertificateAuthority.load(args.ca)
    issued = authority.issue_agent(
        args.name, args.pubkey, validity=args.validity, output=args.out, force=args.force
    )
    _print_issued(issued)


def _issue_host(args: argparse.Namespace) -> None:
    authority = ca.CertificateAuthority.load(args.ca)
    issued = authority.issue_host(
        args.hostname, args.pubkey, validity=args.validity, output=args.out, force=args.force
    )
    _print_issued(issued)


def _rotate(args: argparse.Namespace) -> None:
    authority = ca.CertificateAuthority.load(args.ca)
    rotation = ca.rotate_agent(
        authority, args.name, args.dir, args.list, grace=args.grace, validity=args.validity
    )
    print(f"new key {rotation.key.private}, old files kept in {rotation.archived}")
    _print_issued(rotation.certificate)
    for entry in rotation.revoked:
        print(f"revocation list {args.list}: {entry.format()}")


def _revoke(args: argparse.Namespace) -> None:
    effective = None
    if args.grace is not None:
        effective = int(time.time()) + ca.parse_duration(args.grace)
    try:
        if args.key is not None:
            entry = RevocationEntry("key", ca.key_fingerprint_of(args.key), effective)
        elif args.serial is not None:
            entry = RevocationEntry("serial", str(args.serial), effective)
        else:
            entry = RevocationEntry("key-id", args.key_id, effective)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    ca.append_revocations(args.list, [entry], args.comment)
    print(f"revocation list {args.list}: {entry.format()}")


def _show(args: argparse.Namespace) -> None:
    path: Path = args.file
    try:
        info = ca.read_certificate(path)
    except ConfigError:
        key = load_public_key(path, "certificate or public key")
        print(f"type:       {key.get_algorithm()} public key")
        print(f"key:        {key_fp(key)}")
        return
    print(f"type:       {info.kind} certificate")
    print(f"principals: {', '.join(info.principals) or '(none: any name)'}")
    print(f"valid:      {format_time(info.valid_after)} .. {format_time(info.valid_before)}")
    print(f"serial:     {info.serial}")
    print(f"key id:     {info.key_id}")
    print(f"key:        {info.key_fingerprint}")
    print(f"signed by:  {info.ca_fingerprint}")


def _print_issued(issued: ca.IssuedCertificate) -> None:
    info = issued.info
    print(
        f"wrote {issued.path}: {info.kind} certificate serial {info.serial} for "
        f"{', '.join(info.principals)}, valid until {format_time(info.valid_before)}"
    )


def script() -> NoReturn:
    """The ``backhaul-certs`` console script."""
    run_script(main)


if __name__ == "__main__":
    script()
