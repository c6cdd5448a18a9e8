"""Where records come from: files, globs (one file per replica), ``.gz``, ``-`` for stdin.

DuckDB reads the files itself (gzip by extension); stdin is spooled to a temporary
file first (gzip detected by its magic bytes) so every input takes the same path.
Malformed lines are *counted* by the engine; when there are some, ``locate_malformed``
reads the affected files again in Python to name their line numbers (only then: a
clean input pays nothing for it).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, cast

import orjson

from guard.monitor.definitions import parse_ts

_GLOB_CHARS = set("*?[")


class SourceError(ValueError):
    """An input that names nothing readable (missing file, glob matching nothing)."""


@dataclass(frozen=True)
class Malformed:
    path: str
    line: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"file": self.path, "line": self.line, "reason": self.reason}


def expand(inputs: list[str]) -> list[str]:
    """Paths for the arguments, in order, each once; ``-`` kept as is.

    A glob that matches nothing and a file that does not exist are errors: a report
    over fewer replicas than asked for would look healthy.
    """
    out: list[str] = []
    for arg in inputs:
        if arg == "-":
            out.append(arg)
            continue
        if os.path.isfile(arg):
            out.append(arg)
            continue
        if _GLOB_CHARS & set(arg):
            matches = sorted(p for p in glob.glob(os.path.expanduser(arg)) if os.path.isfile(p))
            if not matches:
                raise SourceError(f"no record files match {arg!r}")
            out.extend(matches)
            continue
        if os.path.isdir(arg):
            raise SourceError(f"{arg}: is a directory (give files or a glob, e.g. '{arg}/*.jsonl')")
        raise SourceError(f"{arg}: no such file")
    return list(dict.fromkeys(out))


@contextlib.contextmanager
def resolved(
    inputs: list[str], stdin: BinaryIO | None = None
) -> Iterator[tuple[list[str], list[str]]]:
    """(paths to read, names to show): ``expand`` plus stdin spooled to a temporary
    file (shown as ``-``), removed on exit."""
    paths = expand(inputs)
    with tempfile.TemporaryDirectory(prefix="loopguard-report-") as tmp:
        if "-" in paths:
            stream = stdin if stdin is not None else sys.stdin.buffer
            head = stream.read(2)
            spool = Path(tmp) / ("stdin.jsonl.gz" if head == b"\x1f\x8b" else "stdin.jsonl")
            with spool.open("wb") as out:
                out.write(head)
                shutil.copyfileobj(stream, out, 1 << 20)
            yield [str(spool) if p == "-" else p for p in paths], paths
        else:
            yield paths, paths


def _open(path: str) -> IO[bytes]:
    if path.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def why_malformed(line: bytes) -> str | None:
    """Why a non-blank line is not a record (None: it is one). Same rule as the engine's:
    a JSON object whose ``ts`` is a parsable timestamp."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(value, dict):
        return "not a JSON object"
    if "ts" not in value:
        return "no ts"
    if parse_ts(value["ts"]) is None:
        return "ts is not an ISO 8601 time"
    return None


def locate_malformed(paths: list[str], limit: int = 20) -> list[Malformed]:
    """The first ``limit`` malformed lines (file, 1-based line number, reason)."""
    found: list[Malformed] = []
    for path in paths:
        try:
            with _open(path) as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    reason = why_malformed(line)
                    if reason is not None:
                        found.append(Malformed(path, number, reason))
                        if len(found) >= limit:
                            return found
        except (OSError, EOFError) as exc:
            found.append(Malformed(path, 0, f"unreadable: {exc}"))
    return found
