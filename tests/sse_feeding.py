"""Feeding an SSE parser a stream cut at given offsets, shared by the SSE tests and
the fuzzing suite."""

from __future__ import annotations

from adapters.sse import SSEEvent, SSEParser


def feed_chunks(stream: bytes, cuts: list[int]) -> tuple[list[SSEEvent], SSEParser]:
    """The events of ``stream`` fed in pieces cut at ``cuts``, and the parser after."""
    parser = SSEParser()
    events: list[SSEEvent] = []
    last = 0
    for cut in [*sorted(cuts), len(stream)]:
        events += parser.feed(stream[last:cut])
        last = cut
    return events, parser


def fields(events: list[SSEEvent]) -> list[tuple[str, str, str | None]]:
    """What a client sees of each event: its type, data and last id."""
    return [(e.event, e.data, e.id) for e in events]
