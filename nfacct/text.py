"""Names from /proc: process names (comm), command lines and cgroup paths.

They are bytes chosen by whoever runs the process, not necessarily UTF-8, and may hold control
characters. nfacct keeps them exact and shows them escaped:

- in memory, a `str` decoded with 'surrogateescape': valid UTF-8 reads as usual, every other
  byte becomes a lone surrogate U+DC80..U+DCFF, and `encode` gives the original bytes back;
- in SQLite, TEXT when the bytes are valid UTF-8 (queries stay readable), else a BLOB of the
  exact bytes (`to_sql`, `from_sql`);
- in JSON (`json.dumps`' default ensure_ascii), a lone surrogate is the escape "\\udcff", which
  Python's json reads back to the same str;
- on a terminal, `escape`: control characters and undecodable bytes as backslash escapes.

Every str here comes from `decode` (directly, through SQLite or through JSON), so the only
surrogates it holds are the U+DC80..U+DCFF that 'surrogateescape' makes.
"""

from __future__ import annotations

_SURROGATE_BYTES = range(0xDC80, 0xDD00)  # 'surrogateescape' maps byte b (>= 0x80) to U+DC00 + b


def decode(raw: bytes) -> str:
    """Bytes from /proc as a str that `encode` turns back into the same bytes."""
    return raw.decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    """The exact bytes a `decode`d str came from."""
    return text.encode("utf-8", "surrogateescape")


def to_sql(text: str | None) -> str | bytes | None:
    """TEXT if the name is valid UTF-8, else a BLOB of its bytes (sqlite3 cannot bind a lone surrogate)."""
    if text is None or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return encode(text)
    return text


def from_sql(value: str | bytes | None) -> str | None:
    """A column written by `to_sql`, back as the str it was."""
    return decode(value) if isinstance(value, bytes) else value


def escape(text: str) -> str:
    """`text` with nothing a terminal would interpret: every character that is not printable
    becomes an escape. `\\xNN` is always one byte (an ASCII control character, or a byte that is
    not UTF-8); other invisible characters (C1 controls, bidi overrides, ...) are `\\uNNNN`."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    code = ord(c)
    if code in _SURROGATE_BYTES:
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return c.encode("unicode_escape").decode()  # \t \n \r, or \x1b
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
