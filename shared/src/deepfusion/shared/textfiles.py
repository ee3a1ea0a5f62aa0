"""Local text files read line by line, with errors that name the file and the line at fault.

    for number, line in numbered_lines(path):     # TextFileError: unreadable, or a line not UTF-8
        text = jsonl_text(path, number, line)     # its string "text" field, else TextFileError

The cloud (public text, test sets), the devices (private text) and the shard codec read their texts
through these, so a bad line gets the same message wherever it is found.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

__all__ = ["NOT_A_TEXT_OBJECT", "TextFileError", "json_text", "jsonl_text", "numbered_lines"]

NOT_A_TEXT_OBJECT = 'is not a JSON object with a string "text" field'


class TextFileError(ValueError):
    """A local text file that cannot be read, or a line of it that is not a text; the message names the
    file and the line, and how to fix it."""


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 text file, numbered from 1."""
    try:
        # Undecodable bytes are escaped and refused line by line: a strict decode fails a whole chunk
        # ahead of the line being read, so its error could not say which line is at fault.
        with path.open(encoding="utf-8", errors="surrogateescape") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError:
                    raise TextFileError(
                        f"{path}:{number} is not UTF-8 text; save the file as UTF-8"
                    ) from None
                yield number, line
    except OSError as exc:
        raise TextFileError(f"{path} cannot be read ({exc.strerror or exc})") from None


def json_text(line: str) -> str | None:
    """The string "text" field of one JSON line; None when the line is not such an object."""
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError):  # not JSON, no "text" key, not an object
        return None
    return text if isinstance(text, str) else None


def jsonl_text(path: Path, number: int, line: str) -> str:
    """`json_text` of line `number` of `path`, or the TextFileError that names it."""
    text = json_text(line)
    if text is None:
        raise TextFileError(f'{path}:{number} {NOT_A_TEXT_OBJECT}; write one {{"text": ...}} object per line')
    return text
