"""Streaming compression (agent) and streaming decompression checks (collector, restore).

zstd (default, level 3) and gzip. The checker decompresses as bytes arrive, with
bounded memory even against a decompression bomb: input is fed in small slices, so
one call can expand to at most a few tens of MiB, and a cap on the total expanded size
stops a bomb early. It keeps only the tail of the output, for the dump-trailer check.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Protocol

import zstandard

from common.errors import IntegrityError

KINDS = ("zstd", "gzip")
DEFAULT_LEVELS = {"zstd": 3, "gzip": 6}
_SLICE = 1024  # compressed bytes per decompress call: bounds one call's output
TAIL_BYTES = 4096
RATIO_GRACE = 64 * 1024 * 1024  # the expansion ratio is judged only past this output


class Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Zstd:
    def __init__(self, level: int, threads: int) -> None:
        cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, threads=threads)
        self._obj = cctx.compressobj()

    def compress(self, data: bytes) -> bytes:
        return bytes(self._obj.compress(data))

    def flush(self) -> bytes:
        return bytes(self._obj.flush())


class _Gzip:
    def __init__(self, level: int) -> None:
        self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31: gzip container

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


def make_compressor(kind: str, level: int | None = None, threads: int = 0) -> Compressor:
    """A streaming compressor; ``threads`` > 0 lets zstd use worker threads.

    Raises:
        ValueError: unknown kind.
    """
    if kind == "zstd":
        return _Zstd(DEFAULT_LEVELS["zstd"] if level is None else level, threads)
    if kind == "gzip":
        return _Gzip(DEFAULT_LEVELS["gzip"] if level is None else level)
    raise ValueError(f"unknown compression {kind!r}; choose one of {', '.join(KINDS)}")


class _Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...


def _decoder(kind: str) -> _Decoder:
    if kind == "zstd":
        obj: _Decoder = zstandard.ZstdDecompressor().decompressobj()
        return obj
    if kind == "gzip":
        return zlib.decompressobj(31)
    raise ValueError(f"unknown compression {kind!r}")


class StreamChecker:
    """Decompresses a stream as it arrives and proves it is whole.

    ``sink``, when given, receives every decompressed chunk (a format verifier or a
    restore). ``max_output`` caps the expanded size and ``max_ratio`` the expansion
    ratio (decompression bombs).
    """

    def __init__(
        self,
        kind: str,
        max_output: int | None = None,
        sink: Callable[[bytes], None] | None = None,
        max_ratio: int | None = None,
    ) -> None:
        self.kind = kind
        self.input_bytes = 0
        self.output_bytes = 0
        self._max_ratio = max_ratio
        self.tail = b""
        self._decoder = _decoder(kind)
        self._max_output = max_output
        self._sink = sink

    def feed(self, data: bytes) -> None:
        """Decompress ``data``.

        Raises:
            IntegrityError: corrupt stream, bytes after its end, or over ``max_output``.
        """
        view = memoryview(data)
        for start in range(0, len(view), _SLICE):
            if self._decoder.eof:
                raise IntegrityError(f"{self.kind} stream has bytes after its end")
            piece = bytes(view[start : start + _SLICE])
            self.input_bytes += len(piece)
            try:
                out = self._decoder.decompress(piece)
            except (zstandard.ZstdError, zlib.error) as exc:
                raise IntegrityError(f"{self.kind} stream is corrupt: {exc}") from None
            if out:
                self._take(out)
        if self._decoder.eof and self._decoder.unused_data:
            raise IntegrityError(f"{self.kind} stream has bytes after its end")

    def _take(self, out: bytes) -> None:
        self.output_bytes += len(out)
        if self._max_output is not None and self.output_bytes > self._max_output:
            raise IntegrityError(
                f"{self.kind} stream expands beyond the limit of {self._max_output} bytes"
            )
        if (
            self._max_ratio is not None
            and self.output_bytes > RATIO_GRACE
            and self.output_bytes > self._max_ratio * self.input_bytes
        ):
            raise IntegrityError(
                f"{self.kind} stream expands more than {self._max_ratio}:1 "
                "(a decompression bomb?)"
            )
        self.tail = (self.tail + out[-TAIL_BYTES:])[-TAIL_BYTES:]
        if self._sink is not None:
            self._sink(out)

    def finish(self) -> None:
        """Check the stream reached its end.

        Raises:
            IntegrityError: the stream is truncated.
        """
        if not self._decoder.eof:
            raise IntegrityError(f"{self.kind} stream is truncated (no end of stream)")
