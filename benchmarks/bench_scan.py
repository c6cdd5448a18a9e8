"""The scrub's cost per character on large free text (issue 12 row 1).

    python benchmarks/bench_scan.py

Pathological runs (2 MB of ``1 1 1 …``, ``1-1-1-…``, random digits), a 1.3 MB tool-result
JSON scrubbed as text (by the display and the hashing redactor) and walked parsed, 1 MB
of prose dense with cards, phones and emails, and the worst case left: separate runs
just under the number scan's bound, made of single digits. Best of three, one core.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from guard.engine.redact import Redactor  # noqa: E402

SIZE = 2_000_000


def tool_result() -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    for i in range(6_600):
        items.append(
            {
                "id": i,
                "order": f"A{100000 + i}",
                "name": f"Customer {i}",
                "email": f"user{i}@example.com",
                "phone": f"+1 415 555 {i % 10000:04d}",
                "amount": f"12.{i % 100:02d}",
                "created": f"2024-05-{i % 28 + 1:02d}T10:{i % 60:02d}:00Z",
                "note": f"Shipped via UPS, tracking 1Z999AA1012345678{i % 10}, card ending 4242, "
                f"ip 10.0.{i % 256}.{i * 7 % 256}",
            }
        )
    return items


def best_of_three(run: object) -> float:
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    rng = random.Random(1)
    items = tool_result()
    prose = (
        "The quarterly report shows revenue of 1,234,567 dollars in 2024, up 12 % from 2023. "
        "Call +1 (415) 555-0100 or email sales@example.com; order 4111 1111 1111 1111 was "
        "refunded. "
    )
    texts = {
        "1 1 1 ...": "1 " * (SIZE // 2),
        "1-1-1-...": "1-" * (SIZE // 2),
        "random digits": "".join(rng.choice("0123456789") for _ in range(SIZE)),
        "tool result JSON as text": json.dumps(items),
        "prose": (prose * (1_000_000 // len(prose) + 1))[:1_000_000],
        "runs under the bound, 1 1 1 ... 1x": (("1 " * 47)[:-1] + "x") * (SIZE // 94),
    }
    display = Redactor(key=b"k" * 32)
    hashing = Redactor(key=b"k" * 32, hashing=True)
    print(f"{'input':<40} {'chars':>9} {'ms':>8} {'us/char':>8}")
    for name, text in texts.items():
        took = best_of_three(lambda text=text: display.redact_text(text))
        print(f"{name:<40} {len(text):>9} {took * 1000:>8.1f} {took / len(text) * 1e6:>8.4f}")
    text = texts["tool result JSON as text"]
    took = best_of_three(lambda: hashing.redact_text(text))
    print(
        f"{'  the same, hashing redactor':<40} {len(text):>9} {took * 1000:>8.1f} "
        f"{took / len(text) * 1e6:>8.4f}"
    )

    def walk() -> None:
        hashing.redact(items)
        hashing._str_cache.clear()

    took = best_of_three(walk)
    print(
        f"{'  the same parsed, redact() walk':<40} {len(text):>9} {took * 1000:>8.1f} "
        f"{took / len(text) * 1e6:>8.4f}"
    )


if __name__ == "__main__":
    main()
