"""A FastAPI tool server that guards itself with ``GuardMiddleware``.

Run it (from the repository root):

    uvicorn examples.fastapi_tool_server:app --port 8000
    # or: python examples/fastapi_tool_server.py        (PORT=8000 by default)

Then call a tool the way an agent that loops would:

    for i in 1 2 3 4; do
      curl -s -i -X POST localhost:8000/tools/lookup_tracking \\
        -H 'x-loopguard-session: run-1' -H 'content-type: application/json' \\
        -d '{"order_id": "FS-1001"}' | head -1
    done

The first three calls run the tool; the fourth gets ``422`` with an
``application/problem+json`` body (tool, rule, repeats, and a ``detail`` written for
the model: "loopguard stopped this call: `lookup_tracking` with these same arguments
returned the same result 3 times...") and never reaches the tool. ``poll_status``
returns something new every time, so it is never stopped. Loop detection is per
session: send ``x-loopguard-session`` (a request without it is served, not tracked).

Durable records (one redacted JSON line per call) go to ./loopguard-records.jsonl;
``RECORDS=path`` moves them, ``RECORDS=`` turns them off.
"""

from __future__ import annotations

import itertools
import os

from fastapi import FastAPI
from pydantic import BaseModel

from guard import GuardMiddleware
from guard.engine.config import Config

api = FastAPI(title="FastShip tools")


class Order(BaseModel):
    order_id: str


class Job(BaseModel):
    job_id: str


_steps = itertools.count(1)


@api.post("/tools/lookup_tracking")
async def lookup_tracking(order: Order) -> dict[str, str]:
    # The same scan every time: an agent waiting for it to change is looping.
    return {"order_id": order.order_id, "status": "in transit", "last_scan": "Memphis TN hub"}


@api.post("/tools/poll_status")
async def poll_status(job: Job) -> dict[str, str]:
    # Moves on with every poll: progress, never stopped.
    return {"job_id": job.job_id, "status": f"step {next(_steps)} of 100"}


@api.get("/health")
async def health() -> dict[str, str]:
    # Outside every route: the guard passes it straight through.
    return {"status": "ok"}


# The guard's config, built in code (GuardMiddleware(api, "loopguard.toml") reads a file).
# Only paths under a route's prefix are guarded; with the middleware the app itself is
# the upstream, so `upstream` is only a placeholder.
# Durable records: one redacted JSON line per call (RECORDS="" turns them off).
RECORDS = os.environ.get("RECORDS", "loopguard-records.jsonl")

config = Config.from_mapping(
    {
        "loop": {"max_repeats": 3},
        "telemetry": {"records": RECORDS},
        "routes": [{"prefix": "/tools", "upstream": "http://app", "adapter": "http-tool"}],
    }
)

# Pure ASGI: streaming responses, lifespan and websockets pass through untouched.
app = GuardMiddleware(api, config)


def main() -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))


if __name__ == "__main__":
    main()
