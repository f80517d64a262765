"""Splitting a text into translatable segments and the verbatim layout around them.

A chat response is markdown-ish: code blocks, list markers, headings, quotes and table borders
must come back unchanged while the words between them are translated. ``split_segments`` cuts a
text into (piece, translate?) pairs and ``join_segments`` puts them back: joining the pieces
unchanged gives the text again, exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# An opening code fence: ``` or ~~~ (3 or more), possibly indented (fences inside list items are).
_FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})")
# Line prefixes that are layout, not text: list markers ("- ", "* ", "+ ", "1. ", "1) "), task
# boxes ("[ ] "), headings ("## ") and quotes (">"), in any combination ("> - [x] ").
_PREFIX = re.compile(r"[ \t]*(?:(?:[-*+]|\d{1,9}[.)]|#{1,6})[ \t]+|>[ \t]*|\[[ xX]\][ \t]+)*")
_LIST_ITEM = re.compile(r"[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+")
_TABLE_ROW = re.compile(r"[ \t]*\|.*\|\s*")
_TABLE_PIPE = re.compile(r"((?<!\\)\|)")  # a cell border; "\|" is a literal pipe inside a cell
_INLINE_CODE_ONLY = re.compile(r"`[^`]+`")


def _indent(s: str) -> int:
    """Columns of leading whitespace (tabs to multiples of 4, as Markdown counts them)."""
    return len(s[: len(s) - len(s.lstrip(" \t"))].expandtabs(4))


def _has_text(s: str) -> bool:
    # Letters or digits in any script; a line without any ("---", "| :-: |", "**") is pure markup.
    return any(c.isalnum() for c in s)


def split_segments(text: str) -> list[tuple[str, bool]]:
    """Cut ``text`` into ``(segment, translate)`` pairs; ``join_segments`` restores it exactly.

    Translatable segments are single lines of prose, stripped of surrounding whitespace and of
    leading list markers, headings and quote marks (those are kept, untranslated, as segments of
    their own). Kept verbatim: newlines, blank lines, fenced code blocks (``` or ~~~, up to the
    closing fence, or to the end of the text if none), indented code blocks (after a blank line,
    indented 4 columns past the enclosing text: 4 spaces or a tab, or inside a list 4 past the
    item's text, as in Markdown), lines without letters or digits (rules, table separators),
    lines that are one inline code span, and table pipes (each cell is its own segment).
    Adjacent verbatim pieces are merged, so segments alternate where they can.

        >>> split_segments("- Hi there\\n```\\nx = 1\\n```")
        [('- ', False), ('Hi there', True), ('\\n```\\nx = 1\\n```', False)]
    """
    segments: list[tuple[str, bool]] = []

    def keep(s: str) -> None:
        if not s:
            return
        if segments and not segments[-1][1]:
            segments[-1] = (segments[-1][0] + s, False)
        else:
            segments.append((s, False))

    def prose(s: str) -> None:
        # s has text; surrounding whitespace stays verbatim so that the layout survives the model.
        body = s.strip()
        start = s.index(body)
        keep(s[:start])
        segments.append((body, True))
        keep(s[start + len(body) :])

    lines = text.split("\n")
    fence: str | None = None  # the opening fence while inside a fenced block
    list_indent: int | None = None  # content column of the last list item, while in a list
    prev_blank = True  # indented code starts after a blank line (or at the start of the text)
    prev_code = False
    for i, line in enumerate(lines):
        newline = "\n" if i < len(lines) - 1 else ""
        if fence is not None:
            keep(line + newline)
            if re.fullmatch(rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*", line):
                fence = None
            continue
        m = _FENCE_OPEN.match(line)
        if m:
            fence = m.group(1)
            keep(line + newline)
            prev_blank = prev_code = False
            continue
        if not line.strip():
            keep(line + newline)
            prev_blank = True  # prev_code stays: blank lines inside an indented code block are part of it
            continue
        item = _LIST_ITEM.match(line)
        indent = _indent(line)
        # As in Markdown: code is indented 4 columns past the text it belongs to, which inside a list
        # is the item's text ("1. Step" -> column 3, so code at 7+); 4 columns there is a paragraph.
        code_column = 4 if list_indent is None else list_indent + 4
        if not item and indent >= code_column and (prev_blank or prev_code):
            keep(line + newline)
            prev_blank, prev_code = False, True
            continue
        prev_blank = prev_code = False
        if item:
            list_indent = len(item.group(0).expandtabs(4))
        elif indent == 0:
            list_indent = None
        if not _has_text(line):
            keep(line + newline)
        elif _TABLE_ROW.fullmatch(line):
            for part in _TABLE_PIPE.split(line):
                if _has_text(part):
                    prose(part)
                else:
                    keep(part)  # a pipe, or an empty cell
            keep(newline)
        else:
            prefix = _PREFIX.match(line).group(0)
            rest = line[len(prefix) :]
            keep(prefix)
            if _has_text(rest) and not _INLINE_CODE_ONLY.fullmatch(rest.strip()):
                prose(rest)
            else:
                keep(rest)
            keep(newline)
    return segments


def join_segments(segments: Iterable[tuple[str, bool]]) -> str:
    """The text of ``(segment, translate)`` pairs: their concatenation (the layout is in the segments)."""
    return "".join(segment for segment, _ in segments)
