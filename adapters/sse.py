"""An incremental Server-Sent Events parser (WHATWG HTML "event stream" rules).

Fed whatever chunks the network hands over, it returns the events each chunk
completes. Events may be split at any byte (even inside a UTF-8 sequence or between
the ``\\r`` and ``\\n`` of one line ending); lines end with ``\\n``, ``\\r\\n`` or
``\\r``; ``:`` lines are comments (keep-alive pings); several ``data:`` lines join
with ``\\n``.

Each event also carries the byte span it occupied in the stream, so an observer can
cut out one event (the usage chunk loopguard asked for on the client's behalf) and
pass every other byte on unchanged.

It keeps only the current unfinished line and event, and never more than
``max_block`` bytes of it: a block (event) that grows past that is skipped to its
end, its bytes counted as finished but never dispatched (``skipped`` counts them).
Memory is bounded by ``max_block``, never by the stream or by what an upstream sends.
"""

from __future__ import annotations

from dataclasses import dataclass

_CR = 0x0D
_LF = 0x0A

# The largest unfinished block kept by default: far above any model API's event.
MAX_BLOCK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SSEEvent:
    # The ``event:`` field; "" when absent (a client treats it as "message").
    event: str
    data: str
    # The last event id seen so far in the stream (it persists across events).
    id: str | None
    # Absolute byte offsets in the stream: from the start of the event's block (just after
    # the previous blank line) to just after the blank line that dispatched it.
    start: int
    end: int


class SSEParser:
    """``feed(chunk) -> list[SSEEvent]``; ``boundary`` is where the last block ended.

    Two paths, one result. Streams with ``\n`` line endings only (what OpenAI and
    Anthropic send) take the fast path: bytes since the last block boundary are kept
    and split on ``\n\n``, a few C-level calls per event. The first ``\r`` seen
    switches the parser, for good, to the general line-by-line path, which handles
    ``\r\n``, lone ``\r`` and a ``\r`` / ``\n`` pair split across chunks.
    """

    __slots__ = (
        "_buf",
        "_data",
        "_data_bytes",
        "_event",
        "_has_data",
        "_last_id",
        "_line",
        "_offset",
        "_pending_cr",
        "_skip_tail",
        "_skipping",
        "_slow",
        "_started",
        "boundary",
        "max_block",
        "skipped",
    )

    def __init__(self, max_block: int = MAX_BLOCK_BYTES) -> None:
        self.max_block = max_block
        # Fast path: the bytes after ``boundary`` (an unfinished block).
        self._buf = bytearray()
        self._slow = False
        # General path: the current unfinished line, and the fields of the current event.
        self._line = bytearray()
        self._data: list[bytes] = []
        self._data_bytes = 0
        self._has_data = False
        self._event = ""
        # Skipping an oversized block to its end; fast path: the last byte skipped, to
        # find a blank line cut across chunks.
        self._skipping = False
        self._skip_tail = b""
        self.skipped = 0
        self._last_id: str | None = None
        # Bytes consumed so far; the absolute offset of the next byte fed.
        self._offset = 0
        # The previous chunk ended with "\r": a "\n" opening the next one ends nothing.
        self._pending_cr = False
        self._started = False
        # Absolute offset just after the last blank line: every byte before it belongs to
        # a finished block (an event or comments), every byte after to an unfinished one.
        self.boundary = 0

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def pending(self) -> bool:
        """True when part of an event (or line) has been read but not yet dispatched."""
        return (
            bool(self._buf)
            or bool(self._line)
            or self._has_data
            or bool(self._event)
            or self._skipping
        )

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not self._started and chunk:
            # A UTF-8 byte order mark may open the stream (only handled whole: rare).
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                self._offset += 3
                self.boundary += 3
                chunk = chunk[3:]
        if self._slow:
            return self._feed_lines(chunk)
        if b"\r" in chunk:
            # Switch for good: replay the unfinished block through the general path.
            self._slow = True
            if self._skipping and self._skip_tail != b"\n":
                self._line[:] = b"-"  # skipping mid-line: its end is not a blank line
            held = bytes(self._buf)
            self._buf.clear()
            self._offset -= len(held)
            return self._feed_lines(held + chunk)
        return self._feed_blocks(chunk)

    # -- fast path: "\n" line endings -----------------------------------------------------

    def _feed_blocks(self, chunk: bytes) -> list[SSEEvent]:
        if self._skipping:
            chunk = self._skip_to_block_end(chunk)
            if self._skipping:
                return []
        buf = self._buf
        buf += chunk
        self._offset += len(chunk)
        self._skip_blank_lines()
        last = buf.rfind(b"\n\n")
        if last == -1:
            if len(buf) > self.max_block:
                self._start_skipping()
            return []
        events: list[SSEEvent] = []
        at = self.boundary
        for block in bytes(buf[:last]).split(b"\n\n"):
            end = at + len(block) + 2
            start = at
            data: list[bytes] | None = None
            event = ""
            for line in block.split(b"\n"):
                if not line:
                    # A blank line opening the block (three or more "\n" in a row).
                    if data is not None:
                        events.append(self._dispatch(event, data, start, at + 1))
                    data, event = None, ""
                    start = at = at + 1
                    continue
                at += len(line) + 1
                if line.startswith(b"data:"):
                    value = line[5:]
                    if value[:1] == b" ":
                        value = value[1:]
                    if data is None:
                        data = [value]
                    else:
                        data.append(value)
                elif line[0] == 0x3A:  # ":" comment (keep-alive ping)
                    continue
                else:
                    name, value_s = _split_field(line)
                    if name == "data":  # "data" with no colon: an empty data line
                        data = [b""] if data is None else [*data, b""]
                    elif name == "event":
                        event = value_s
                    elif name == "id" and "\x00" not in value_s:
                        self._last_id = value_s
            if data is not None:
                events.append(self._dispatch(event, data, start, end))
            at = end
        del buf[: last + 2]
        self.boundary = at
        self._skip_blank_lines()
        if len(buf) > self.max_block:
            self._start_skipping()
        return events

    def _start_skipping(self) -> None:
        """The unfinished block is over ``max_block``: drop it, skip to its end."""
        self.skipped += 1
        self._skipping = True
        self._skip_tail = bytes(self._buf[-1:])
        self._buf.clear()
        if self._line:  # general path, mid-line: its end is not a blank line
            self._line[:] = b"-"
        self._data = []
        self._data_bytes = 0
        self._has_data = False
        self._event = ""
        self.boundary = self._offset

    def _skip_to_block_end(self, chunk: bytes) -> bytes:
        """Fast path, skipping: consume ``chunk`` up to the blank line that ends the
        skipped block; the bytes after it (b"" while the block goes on)."""
        tail = self._skip_tail
        end = (tail + chunk).find(b"\n\n")
        if end == -1:
            if chunk:
                self._skip_tail = chunk[-1:]
            used = len(chunk)
        else:
            self._skipping = False
            self._skip_tail = b""
            used = end + 2 - len(tail)
        self._offset += used
        self.boundary = self._offset
        return chunk[used:]

    def _skip_blank_lines(self) -> None:
        # A "\n" at a block boundary is a whole blank line with nothing to dispatch: it
        # moves the boundary now, as it would have inside a longer run of "\n" (so a
        # chunk cut inside "\n\n\n" leaves the parser where one chunk would).
        buf = self._buf
        if buf[:1] != b"\n":
            return
        lead = 1
        while lead < len(buf) and buf[lead] == _LF:
            lead += 1
        del buf[:lead]
        self.boundary += lead

    def _dispatch(self, event: str, data: list[bytes], start: int, end: int) -> SSEEvent:
        text = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
        return SSEEvent(event, text, self._last_id, start, end)

    # -- general path: any line ending -----------------------------------------------------

    def _feed_lines(self, chunk: bytes) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        n = len(chunk)
        pos = 0
        base = self._offset
        if self._pending_cr and n:
            self._pending_cr = False
            if chunk[0] == _LF:
                pos = 1
                if self.boundary == base:
                    # The "\r" that ended a block was a "\r\n" cut in two: its "\n"
                    # belongs to that block, not to the next one's span.
                    self.boundary = base + 1
        while pos < n:
            cr = chunk.find(b"\r", pos)
            lf = chunk.find(b"\n", pos)
            if cr == -1 and lf == -1:
                if self._skipping:
                    self._line[:] = b"-"  # a line is going on: what it holds is not kept
                else:
                    self._line += chunk[pos:]
                break
            if cr == -1 or (lf != -1 and lf < cr):
                eol, nxt = lf, lf + 1
            else:
                eol = cr
                if cr + 1 < n:
                    nxt = cr + 2 if chunk[cr + 1] == _LF else cr + 1
                else:
                    nxt = cr + 1
                    self._pending_cr = True
            if self._line:
                self._line += chunk[pos:eol]
                line = bytes(self._line)
                self._line.clear()
            else:
                line = chunk[pos:eol]
            pos = nxt
            if line:
                if not self._skipping:
                    self._field(line)
                continue
            # A blank line: dispatch the event, if any data was given.
            end = base + nxt
            if self._has_data:
                events.append(self._dispatch(self._event, self._data, self.boundary, end))
            self._data = []
            self._data_bytes = 0
            self._has_data = False
            self._event = ""
            self._skipping = False
            self.boundary = end
        self._offset = base + n
        if self._skipping:
            self.boundary = self._offset
        elif len(self._line) + self._data_bytes > self.max_block:
            self._start_skipping()
        return events

    def _field(self, line: bytes) -> None:
        if line[0] == 0x3A:  # ":" comment (keep-alive ping)
            return
        name, value = _split_field(line)
        if name == "data":
            data = value.encode()
            self._data.append(data)
            self._data_bytes += len(data) + 1
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id" and "\x00" not in value:
            self._last_id = value
        # "retry" and unknown fields are ignored, as the spec says.


def _split_field(line: bytes) -> tuple[str, str]:
    text = line.decode("utf-8", "replace")
    name, sep, value = text.partition(":")
    if sep and value.startswith(" "):
        value = value[1:]
    return name, value


def encode_event(data: str, event: str | None = None) -> bytes:
    """One SSE event, ``\\n`` line endings (what OpenAI and Anthropic send)."""
    head = f"event: {event}\n" if event else ""
    body = "".join(f"data: {line}\n" for line in data.split("\n"))
    return (head + body + "\n").encode()
