"""``loopguard replay FILE``: a recorded trajectory through the detector, offline.

Input formats (detected from the content):

* JSONL, one step a line: ``{"session"?: str, "tool": str, "params": any,
  "result": any, "error"?: bool, "marker"?: str}`` (session defaults to "default";
  ``marker`` is an explicit progress marker, as a tool's ``x-loopguard-progress``);
  a line ``{"session"?: str, "user": any}`` is a human turn: something new for every
  call of its session, as a new user turn is on a model route (it moves the reset
  point; the hard cap still counts across it);
* an OpenAI Chat Completions transcript ``{"messages": [...]}``;
* an OpenAI Responses input ``{"input": [...]}``;
* an Anthropic Messages transcript ``{"messages": [...]}`` with ``tool_use`` blocks;
* a SWE-agent ``.traj`` file ``{"trajectory": [{"action", "observation"}, ...]}``, or
  one holding only its model history ``{"history": [...]}`` (function calling);
* an OpenHands event log: a JSON list of events (its saved trajectory) or one event a
  line (a user message in it is a human turn).

For each step the verdict the guard would give *before* it, given every earlier step
of its session as executed. ``--summary DIR`` replays every file of a folder and prints
per file its first block and rule, then a total. Exit code 0, or 2 for a file that
cannot be read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from adapters.trajectory import (
    history_from_anthropic,
    history_from_openai_chat,
    history_from_openai_responses,
    history_from_openhands,
    history_from_swe_agent,
    is_openhands_event,
    is_swe_agent_traj,
)
from guard.engine.calls import Step, Verdict
from guard.engine.config import Config
from guard.engine.contract import HistoryStep
from guard.engine.store import MemoryStore
from guard.engine.telemetry_port import NullTelemetry

DEFAULT_SESSION = "default"


class ReplayError(ValueError):
    """A trajectory file that cannot be replayed; the message names the place."""


@dataclass(slots=True)
class ReplayStep:
    session: str
    tool: str
    params: Any
    result: Any
    error: bool = False
    marker: str | None = None
    # A human turn (a ``{"user": ...}`` line), not a tool call.
    user: bool = False


# The tool name of a human turn's step in a replayed history: never a real tool name
# (tool names are non-empty strings from the trajectory; this one has a NUL).
HUMAN_TOOL = "\x00user"


def load_steps(path: str) -> list[ReplayStep]:
    name = Path(path).name
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"{path}: cannot read: {exc}") from None
    if not text.strip():
        raise ReplayError(f"{name}: empty file")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    # One JSON document: a transcript (a single-line JSONL step also parses as one).
    if is_swe_agent_traj(whole):  # its trajectory, or its model history alone
        return _steps(history_from_swe_agent(whole), DEFAULT_SESSION)
    if isinstance(whole, list) and whole and is_openhands_event(whole[0]):
        return _steps(history_from_openhands(whole), DEFAULT_SESSION)
    if isinstance(whole, dict) and "tool" not in whole and not is_openhands_event(whole):
        return _transcript_steps(whole, name)
    if (
        isinstance(whole, list)
        and whole
        and all(isinstance(m, dict) and "role" in m for m in whole)
    ):
        return _transcript_steps({"messages": whole}, name)
    first = text.lstrip().split("\n", 1)[0]
    try:
        head = json.loads(first)
    except ValueError:
        head = None
    if is_openhands_event(head):  # an OpenHands event log, one event a line
        try:
            events = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise ReplayError(f"{name}: not an OpenHands event log: {exc}") from None
        return _steps(history_from_openhands(events), DEFAULT_SESSION)
    return _jsonl_steps(text, name)


def _steps(history: list[HistoryStep], session: str) -> list[ReplayStep]:
    return [
        ReplayStep(session, HUMAN_TOOL, None, h.outcome, user=True)
        if h.kind == "user"
        else ReplayStep(session, h.tool, h.params, h.outcome, h.error)
        for h in history
    ]


def _transcript_steps(doc: dict[str, Any], name: str) -> list[ReplayStep]:
    if isinstance(doc.get("messages"), list):
        messages = doc["messages"]
        if _is_anthropic(messages):
            history = history_from_anthropic(messages)
        else:
            history = history_from_openai_chat(messages)
    elif isinstance(doc.get("input"), list):
        history = history_from_openai_responses(doc["input"])
    else:
        raise ReplayError(
            f"{name}: a JSON transcript needs a 'messages' list (OpenAI chat or Anthropic) "
            "or an 'input' list (OpenAI Responses)"
        )
    named = doc.get("session")
    return _steps(history, named if isinstance(named, str) else DEFAULT_SESSION)


def _is_anthropic(messages: list[Any]) -> bool:
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for block in content:
                if isinstance(block, dict) and block.get("type") in ("tool_use", "tool_result"):
                    return True
    return False


def _jsonl_steps(text: str, name: str) -> list[ReplayStep]:
    steps = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise ReplayError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ReplayError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
        if "user" in obj and "tool" not in obj:
            session = obj.get("session", DEFAULT_SESSION)
            if not isinstance(session, str):
                raise ReplayError(f"{where}: 'session' must be a string")
            steps.append(ReplayStep(session, HUMAN_TOOL, None, obj["user"], user=True))
            continue
        tool = obj.get("tool")
        if not isinstance(tool, str) or not tool:
            raise ReplayError(f"{where}: 'tool' must be a non-empty string")
        session = obj.get("session", DEFAULT_SESSION)
        if not isinstance(session, str):
            raise ReplayError(f"{where}: 'session' must be a string")
        error = obj.get("error", False)
        if not isinstance(error, bool):
            raise ReplayError(f"{where}: 'error' must be true or false")
        marker = obj.get("marker")
        if marker is not None and not isinstance(marker, str):
            raise ReplayError(f"{where}: 'marker' must be a string")
        steps.append(
            ReplayStep(session, tool, obj.get("params", {}), obj.get("result"), error, marker)
        )
    return steps


def replay(steps: list[ReplayStep], config: Config) -> list[tuple[ReplayStep, Verdict]]:
    """The verdict before each step, given the earlier steps of its session."""
    from guard.engine.core import Engine

    # Replay records nothing: no spans, no metrics, no threads.
    engine = Engine(config, store=MemoryStore(), telemetry=NullTelemetry())
    histories: dict[str, list[Step]] = {}
    out = []
    for index, step in enumerate(steps):
        history = histories.setdefault(step.session, [])
        if step.user:
            # A marker no step had: something new, so every call's count restarts.
            out.append((step, Verdict("allow", HUMAN_TOOL, "")))
            history.append(Step(HUMAN_TOOL, "", f"turn:{index}"))
            continue
        params_hash = engine.fingerprint(step.params)
        verdict = engine.evaluate(history, step.tool, params_hash)
        out.append((step, verdict))
        marker = engine.marker(step.tool, step.result, step.marker)
        # Not trimmed: the detector reads only the last window steps, and the verdict's
        # step indexes must stay positions in the session's whole history.
        history.append(Step(step.tool, params_hash, marker, step.error))
    return out


def run(path: str, config: Config, as_json: bool, out: TextIO) -> int:
    import sys

    try:
        steps = load_steps(path)
    except ReplayError as exc:
        print(f"loopguard replay: {exc}", file=sys.stderr)
        return 2
    results = replay(steps, config)
    if as_json:
        for index, (step, verdict) in enumerate(results):
            if step.user:
                out.write(json.dumps({"index": index, "session": step.session, "human": True}))
                out.write("\n")
                continue
            row = {
                "index": index,
                "session": step.session,
                "tool": step.tool,
                "action": verdict.action,
                "rule": str(verdict.rule) if verdict.rule else None,
                "repeats": verdict.repeats,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return 0
    _print_plain(results, out)
    return 0


def _print_plain(results: list[tuple[ReplayStep, Verdict]], out: TextIO) -> None:
    # Plain text on purpose: readable in a terminal, a pipe and a CI log alike.
    sessions: dict[str, list[int]] = {}  # session -> global indexes of its steps
    for index, (step, _) in enumerate(results):
        sessions.setdefault(step.session, []).append(index)
    first_block: dict[str, tuple[int, ReplayStep, Verdict]] = {}
    width = len(str(max(len(results) - 1, 0)))
    for index, (step, verdict) in enumerate(results):
        if step.user:
            out.write(f"{index:>{width}}  {step.session}  (human turn)\n")
            continue
        if verdict.action == "block":
            first_block.setdefault(step.session, (index, step, verdict))
            label = "block" if verdict.enforced else "block (observe: served)"
            detail = f"  {label}  {verdict.rule} x{verdict.repeats}"
            if verdict.steps:
                mine = sessions[step.session]
                detail += f" (steps {', '.join(str(mine[i]) for i in verdict.steps)})"
        else:
            detail = "  allow"
        out.write(f"{index:>{width}}  {step.session}  {step.tool}{detail}\n")
    out.write("\n")
    out.write(f"{len(results)} steps, {len(sessions)} session{'s' * (len(sessions) != 1)}\n")
    if not first_block:
        out.write("no blocks\n")
    for session in sessions:
        if session in first_block:
            index, step, verdict = first_block[session]
            out.write(
                f"first block in {session}: step {index} {step.tool} "
                f"({verdict.rule}, {verdict.repeats} repeats)\n"
            )
        else:
            out.write(f"no block in {session}\n")


def summary(folder: str, config: Config, out: TextIO) -> int:
    """Per file of ``folder`` (sorted): its first block and rule, or none; then a total.
    Files that cannot be replayed are named and counted, not fatal."""
    import sys

    root = Path(folder)
    if not root.is_dir():
        print(f"loopguard replay: {folder}: not a folder", file=sys.stderr)
        return 2
    # Notes beside a corpus (a README.md) are not trajectories.
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".md"
    )
    width = max((len(p.name) for p in files), default=0)
    blocked = unreadable = 0
    by_rule: dict[str, int] = {}
    for path in files:
        try:
            steps = load_steps(str(path))
        except ReplayError as exc:
            unreadable += 1
            out.write(f"{path.name:<{width}}  cannot replay: {exc}\n")
            continue
        results = replay(steps, config)
        first = next(((i, s, v) for i, (s, v) in enumerate(results) if v.action == "block"), None)
        calls = sum(1 for s in steps if not s.user)
        if first is None:
            out.write(f"{path.name:<{width}}  {calls} calls  no block\n")
            continue
        index, step, verdict = first
        blocked += 1
        rule = str(verdict.rule)
        by_rule[rule] = by_rule.get(rule, 0) + 1
        out.write(
            f"{path.name:<{width}}  {calls} calls  first block at step {index} "
            f"{step.tool} ({rule}, {verdict.repeats} repeats)\n"
        )
    rules = ", ".join(f"{rule} {n}" for rule, n in sorted(by_rule.items()))
    out.write(
        f"\n{len(files)} files: {blocked} with a block"
        + (f" ({rules})" if rules else "")
        + f", {len(files) - blocked - unreadable} without"
        + (f", {unreadable} unreadable" if unreadable else "")
        + "\n"
    )
    return 0


__all__ = ["HUMAN_TOOL", "ReplayError", "ReplayStep", "load_steps", "replay", "run", "summary"]
