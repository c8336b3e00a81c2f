"""Errors that teach: every rejected spec names file:line:col, shows the line, and hints at a fix."""

from __future__ import annotations

import difflib


class SpecError(ValueError):
    """A spec file that cannot be accepted.

    The message reads `file:line:col: what is wrong`, then the offending line with a caret
    under the column, then a hint. Line and column are 1-based (0 when unknown).
    """

    def __init__(self, message: str, *, filename: str = "<string>", line: int = 0, column: int = 0,
                 source: str | None = None, hint: str | None = None):
        self.filename = filename
        self.line = line
        self.column = column
        self.reason = message
        self.hint = hint
        text = f"{filename}:{line}:{column}: {message}"
        if source is not None and line >= 1:
            # Lines as the parser counts them: only "\n" ends a line (str.splitlines would also split at
            # form feeds and U+2028 and put the wrong line under the caret).
            lines = source.split("\n")
            if line <= len(lines):
                src, caret = _window(_printable(lines[line - 1].rstrip("\r")), max(column - 1, 0))
                text += f"\n    {src}\n    {' ' * caret}^"
        if hint:
            text += f"\nhint: {hint}"
        super().__init__(text)


class BindError(Exception):
    """A mistake at `pos` (line, column), turned into a SpecError (with file, line and source) by the parser."""

    def __init__(self, message: str, pos: tuple[int, int], hint: str | None = None):
        super().__init__(message)
        self.message, self.pos, self.hint = message, pos, hint


def _printable(line: str) -> str:
    """The source line with control characters shown as spaces, so the caret stays under its column."""
    return "".join(" " if (c < " " and c != "\t") or c in "\x7f\u2028\u2029\x85" else c for c in line)


def _window(src: str, caret: int, width: int = 100) -> tuple[str, int]:
    """At most `width` characters of a long line around the caret (a 5,000-digit literal stays readable)."""
    if len(src) <= width:
        return src, caret
    start = max(0, min(caret - width // 2, len(src) - width))
    piece = src[start:start + width]
    if start > 0:
        piece, caret = "..." + piece, caret + 3
    if start + width < len(src):
        piece += "..."
    return piece, caret - start


def suggest(name: str, known, prefix: str = "; did you mean ") -> str:
    """'; did you mean X?' for the nearest known name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"{prefix}{close[0]!r}?" if close else ""
