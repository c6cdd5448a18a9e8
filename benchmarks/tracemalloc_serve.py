"""``loopguard serve`` under tracemalloc, for finding what a soak's RSS growth is made of.

    python benchmarks/tracemalloc_serve.py DIR serve --config soak.toml

Starts tracemalloc (``LOOPGUARD_TRACEMALLOC_FRAMES`` frames, default 10) and runs the CLI
with the remaining arguments; each SIGUSR1 writes the next snapshot to DIR/snap-N.pickle
(``benchmarks/soak.py --tracemalloc DIR`` sends one after the warm-up and one at the end,
then prints the top growth by traceback). A debugging tool, not part of the product.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import sys
import tracemalloc
import weakref
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    directory = Path(sys.argv[1])
    tracemalloc.start(int(os.environ.get("LOOPGUARD_TRACEMALLOC_FRAMES", "10")))
    counter = itertools.count()

    # The memory stores made, remembered as they are built (``serve`` freezes the heap
    # with gc.freeze(), so gc.get_objects() cannot find them later).
    from guard.engine.store import MemoryStore

    stores: weakref.WeakSet[MemoryStore] = weakref.WeakSet()
    init = MemoryStore.__init__

    def remembered(self: MemoryStore, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        stores.add(self)

    MemoryStore.__init__ = remembered  # type: ignore[method-assign]

    def dump(_signum: int, _frame: FrameType | None) -> None:
        gc.collect()
        n = next(counter)
        held = sum(store_bytes(store) for store in stores)
        (directory / f"store-{n}.txt").write_text(str(held))
        tracemalloc.take_snapshot().dump(str(directory / f"snap-{n}.pickle"))

    signal.signal(signal.SIGUSR1, dump)
    from guard.cli import main as cli

    sys.argv = ["loopguard", *sys.argv[2:]]
    sys.exit(cli())


def store_bytes(store: Any) -> int:
    """What a memory store holds: its sessions and states with everything reachable from
    them (steps, their strings, the session keys), each object counted once."""
    seen: set[int] = set()
    stack: list[Any] = [store._sessions, store._states]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            stack.extend(obj)
        elif hasattr(type(obj), "__slots__"):
            stack.extend(getattr(obj, name) for name in type(obj).__slots__ if hasattr(obj, name))
    return total


def compare(first: Path, second: Path, top: int = 25) -> None:
    """Print the ``top`` tracebacks whose allocations grew most between two snapshots."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    old = tracemalloc.Snapshot.load(str(first)).filter_traces(ignore)
    new = tracemalloc.Snapshot.load(str(second)).filter_traces(ignore)
    stats = new.compare_to(old, "traceback")
    total = sum(s.size_diff for s in stats)
    print(f"traced growth {total / 2**20:+.1f} MB; top {top} by traceback:")
    for stat in stats[:top]:
        print(f"{stat.size_diff / 2**20:+8.2f} MB {stat.count_diff:+8d} blocks")
        for line in stat.traceback.format()[-12:]:
            print("    " + line)
    by_file = new.compare_to(old, "filename")
    print("growth by file:")
    for stat in by_file[:15]:
        print(f"{stat.size_diff / 2**20:+8.2f} MB  {stat.traceback[0].filename}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        compare(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
