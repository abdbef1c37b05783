"""age v1 encryption and decryption as a stream filter, through the stock `age` CLI.

Why the CLI and not a library: `age` is the reference implementation, maintained, in
Debian, and the very tool an administrator uses to decrypt without Backhaul, so what
the collector writes is what `age -d` reads by construction. It streams in 64 KiB
chunks, so memory stays flat whatever the backup's size. The collector gives it only
public keys (`-R recipients_file`, a path: nothing secret is on argv); decryption, in
`recover`, gets the identity file's path the administrator names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from common.errors import ConfigError, IntegrityError, StorageError

AGE = "age"
_STDERR_CAP = 4096
PIPE_SIZE = 1024 * 1024  # the default /proc/sys/fs/pipe-max-size


def age_binary() -> str:
    """Path of the `age` CLI.

    Raises:
        ConfigError: it is not installed.
    """
    found = shutil.which(AGE)
    if found is None:
        raise ConfigError("the age CLI is not installed (Debian package age)")
    return found


def read_recipients(path: Path, where: str) -> tuple[str, ...]:
    """The age X25519 public keys in ``path``, one a line (`#` comments and blanks skipped).

    Raises:
        ConfigError: unreadable, empty, a private key in it, or a line that is not an
            `age1...` recipient.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc}") from None
    recipients = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("AGE-SECRET-KEY-"):
            raise ConfigError(
                f"{where}: {path} line {number} is a private key; the collector must hold "
                "public keys only (age-keygen -y turns a key file into its public key)"
            )
        if not line.startswith("age1") or len(line) != 62 or " " in line:
            raise ConfigError(f"{where}: {path} line {number} is not an age1... public key")
        recipients.append(line)
    if not recipients:
        raise ConfigError(f"{where}: {path} holds no age1... public key")
    return tuple(recipients)


def fingerprint(recipient: str) -> str:
    """A short, stable name for a public key in manifests: its SHA-256, 16 hex digits."""
    return "sha256:" + hashlib.sha256(recipient.encode()).hexdigest()[:16]


@contextlib.contextmanager
def encrypting(source: Path, recipients_file: Path) -> Iterator[IO[bytes]]:
    """Yield the ciphertext of ``source`` as a readable stream.

    The file goes to `age` as its stdin (the kernel copies it; no byte passes through
    Python on the way in). Leaving the block early kills `age`; reading to the end and
    leaving normally checks its exit status.

    Raises:
        StorageError: the source cannot be opened, or `age` failed.
    """
    try:
        handle = source.open("rb")
    except OSError as exc:
        raise StorageError(f"cannot read {source}: {exc.strerror}") from None
    with handle:
        process = subprocess.Popen(
            [age_binary(), "--encrypt", "-R", str(recipients_file)],
            stdin=handle, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    assert process.stdout is not None
    _widen_pipe(process.stdout)
    finished = False
    try:
        yield process.stdout
        finished = True
    finally:
        _end(process, finished, "age --encrypt")


@contextlib.contextmanager
def decrypting(identity: Path, chunks: Iterator[bytes],
               on_ciphertext: Callable[[bytes], None]) -> Iterator[IO[bytes]]:
    """Yield the plaintext of ``chunks`` (ciphertext) decrypted by `age -d -i identity`.

    A thread feeds the ciphertext to `age`, calling ``on_ciphertext`` on each chunk (to
    hash it) while the caller reads the plaintext: neither side is ever held whole.

    Raises:
        IntegrityError: `age` refused the ciphertext (wrong key, altered bytes).
    """
    process = subprocess.Popen(
        [age_binary(), "--decrypt", "-i", str(identity)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    failure: list[BaseException] = []
    feeder = threading.Thread(target=_feed, args=(process.stdin, chunks, on_ciphertext, failure),
                              daemon=True)
    feeder.start()
    finished = False
    try:
        yield process.stdout
        finished = True
    finally:
        if not finished:
            process.kill()
        feeder.join()
        if failure and finished:
            process.kill()
            process.wait()
            raise failure[0]
        _end(process, finished, "age --decrypt", IntegrityError)


def _widen_pipe(pipe: IO[bytes]) -> None:
    """Grow the pipe from age to 1 MiB: with the default 64 KiB, age and the reader take
    turns (a context switch per 64 KiB) instead of running side by side."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _feed(sink: IO[bytes], chunks: Iterator[bytes], on_chunk: Callable[[bytes], None],
          failure: list[BaseException]) -> None:
    try:
        for chunk in chunks:
            on_chunk(chunk)
            sink.write(chunk)
    except BrokenPipeError:
        pass  # age stopped reading: its exit status says why
    except BaseException as exc:  # reported by the reading side, which owns the error
        failure.append(exc)
    finally:
        with contextlib.suppress(OSError):
            sink.close()


def _end(process: subprocess.Popen[bytes], finished: bool, what: str,
         error: type[StorageError] | type[IntegrityError] = StorageError) -> None:
    if not finished and process.poll() is None:
        process.kill()
    assert process.stdout is not None and process.stderr is not None
    if finished:
        process.stdout.read()  # let age reach its end even if the reader stopped early
    process.stdout.close()
    stderr = process.stderr.read(_STDERR_CAP).decode("utf-8", "replace").strip()
    process.stderr.close()
    code = process.wait()
    if finished and code != 0:
        raise error(f"{what} failed (exit {code}): {stderr.splitlines()[-1] if stderr else ''}")
