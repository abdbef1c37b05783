"""How values are shown to people: untrusted text made visible, byte counts made short.

Database names, reasons and messages can come from a peer or a database server. Before
they reach a log line, an e-mail, a terminal or a REJECT frame, :func:`escape_control`
shows every character that could forge a line, repaint a terminal or hide text as a
visible escape, so what the administrator reads is what was sent.
"""

from __future__ import annotations

import re
import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# "Other" (Cc controls, Cf format incl. bidi overrides and zero-width characters, Cs lone
# surrogates, Co private use, Cn unassigned) and "Separator" (Zl, Zp, and Zs spaces such
# as NBSP, which look like a space but are not one) -- exactly what str.isprintable()
# refuses but for the ASCII space, so the fast path below agrees with the loop.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
# Unicode's Default_Ignorable_Code_Point characters outside those categories: fillers
# and variation selectors that render as nothing (DerivedCoreProperties.txt).
_INVISIBLE = re.compile(
    "[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180d\u180f\u3164\ufe00-\ufe0f\uffa0"
    "\U000e0100-\U000e01ef]"
)
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def escape_control(text: str, *, backslash: bool = True) -> str:
    """Return ``text`` with every unsafe or invisible character as a visible escape.

    The rule, the one place Backhaul answers "how do I show an untrusted string":

    - newline, carriage return and tab become ``\\n``, ``\\r``, ``\\t``;
    - other C0 and C1 controls, DEL, Unicode line and paragraph separators, format
      characters (bidi overrides, zero-width joiners, soft hyphen), every space other
      than the ASCII one (NBSP, ideographic space...), lone surrogates, private-use and
      unassigned code points, and the other default-ignorable characters (fillers,
      variation selectors) become ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``, the shortest
      that holds the code point;
    - a backslash becomes ``\\\\``, so an escape in the output always stands for one
      character of the input and never for text that merely looked like an escape.

    ``backslash=False`` is for a last pass over composed text whose untrusted parts
    were escaped where they were inserted (a log record, a command's error message):
    the same characters are escaped, but the backslashes of those earlier escapes are
    kept so they are not doubled.
    """
    if (  # the common case, a name or line with nothing to escape, at C speed
        text.isprintable()
        and not (backslash and "\\" in text)
        and (text.isascii() or not _INVISIBLE.search(text))
    ):
        return text
    out: list[str] = []
    for char in text:
        if char == "\\":
            out.append("\\\\" if backslash else char)
        elif char in _NAMED:
            out.append(_NAMED[char])
        elif char != " " and _unsafe(char):
            out.append(_code(ord(char)))
        else:
            out.append(char)
    return "".join(out)


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE_CATEGORIES or bool(_INVISIBLE.match(char))


def _code(code: int) -> str:
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def human_bytes(count: float) -> str:
    """A byte count (or rate) in binary units, as ``ls -lh`` shows it: ``1536`` -> ``1.5 KiB``.

    Whole bytes below 1 KiB (``512 B``), one decimal above, up to PiB.
    """
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
