"""Which stored objects an SQL dump creates (triggers, procedures, functions, events,
views) and under which DEFINERs, read from the lines of the dump as it streams by.

A restore needs more privileges for these than for tables, and with binary logging on a
trigger or a function needs SUPER or ``log_bin_trust_function_creators``; knowing them
after the verifying pass lets the restore say what is missing before it touches the
target. Only the start of each line is read: mysqldump and mariadb-dump begin every
such statement on a line of its own, while table data (INSERT lines) never starts so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

HEAD = 512  # bytes of each line kept for matching; the definer fits well within it
_VERSIONED = rb"(?:/\*!\d{5} ?)?"
_NAME = rb"(?:`(?:[^`]|``)*`|'(?:[^']|'')*'|[\w.%-]+)"
_DEFINED = re.compile(
    rb"\A" + _VERSIONED + rb"CREATE(?:\*/)?\s*"
    rb"(?:" + _VERSIONED + rb"DEFINER\s*=\s*(" + _NAME + rb"@" + _NAME + rb")\s*(?:\*/)?\s*)?"
    + _VERSIONED + rb"(?:AGGREGATE\s+)?(TRIGGER|PROCEDURE|FUNCTION|EVENT)\b"
)
_VIEW = re.compile(rb"\A/\*!50001 VIEW ")
_VIEW_DEFINER = re.compile(rb"\A/\*!50013 DEFINER=(" + _NAME + rb"@" + _NAME + rb")")


@dataclass
class SqlObjects:
    """Fed the decompressed dump in pieces of any size; holds what it has seen."""

    kinds: set[str] = field(default_factory=set)  # "trigger", "procedure", ...
    definers: set[str] = field(default_factory=set)  # as written: `user`@`host`
    _line: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            stop = len(data) if end < 0 else end
            room = HEAD - len(self._line)
            if room > 0:
                self._line += data[start:min(stop, start + room)]
            if end < 0:
                return
            self._take(bytes(self._line))
            self._line.clear()
            start = end + 1

    def _take(self, head: bytes) -> None:
        match = _DEFINED.match(head)
        if match is not None:
            self.kinds.add(match.group(2).decode("ascii").lower())
            if match.group(1):
                self.definers.add(match.group(1).decode("utf-8", "replace"))
        elif _VIEW.match(head):
            self.kinds.add("view")
        elif (view_definer := _VIEW_DEFINER.match(head)) is not None:
            self.definers.add(view_definer.group(1).decode("utf-8", "replace"))
