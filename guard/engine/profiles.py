"""Tool profiles: named presets for kinds of tools, each with the limits and the notion
of progress that fit it (issue 14, class 7). A tool gets one by configuration
(``[loop.tools.NAME] profile = "exec"``) or, failing that, by its name
(``loop.profile_names``: a word of the tool's name, split at ``_ - . /`` and camelCase).

``progress`` says what counts as something new from a step of the tool, i.e. what moves
the reset point of the other calls' counts (docs/architecture.md, "The stall rules"):

* ``outcome``: an outcome the window had not seen from the tool (the default);
* ``attempt``: that, or a *successful* call with arguments the window had not seen: the
  tool changes state, so an edit whose output is empty is still an attempt at progress
  (a `sed` edit between two runs of the same failing test);
* ``none``: never: the tool is filler (a `think` call with new text brings nothing new).

Each default, with the reason for it, is in ``PROFILES``; unset limits inherit
``[loop]``, and a tool's own ``[loop.tools.NAME]`` limits win over its profile's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Progress = Literal["outcome", "attempt", "none"]
ProfileName = Literal["exec", "edit", "send", "poll", "read", "search", "think"]


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    progress: Progress = "outcome"
    max_repeats: int | None = None
    max_identical_errors: int | None = None
    max_identical_calls: int | None = None
    max_error_streak: int | None = None
    # Keys volatile in this kind of tool's results only (on top of ``[loop]
    # volatile_keys``): a key that is an id minted per call here can be the very
    # content elsewhere (a search result's ``id``).
    volatile_keys: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {
    # A shell or code runner: running a new command is an attempt (it may build,
    # install, edit with sed); the same command again is judged by its output. pids,
    # durations, cwd and the shell's line counter are volatile by default already.
    "exec": Profile("exec", progress="attempt"),
    # Writes files or records: a new edit is an attempt at progress even when it
    # prints nothing, so re-running the same failing test after each edit is not a loop.
    "edit": Profile("edit", progress="attempt"),
    # Sends a message or posts: every send has an effect on someone else, so the very
    # same message is never sent ten times, whatever ids come back (the peers
    # stop a send loop at 20; loopguard's stalled repeat stops it at the 4th).
    "send": Profile(
        "send",
        max_identical_calls=10,
        # What messaging APIs mint per send, so the same message sent again looks the
        # same: a generic "id" (Discord, Gmail), Slack's "ts"/"thread_ts", Twilio's "sid",
        # Gmail's "threadId". Never volatile globally: a search result's id is content.
        volatile_keys=("id", "sid", "thread_ts", "message_ts", "threadId", "thread_id"),
    ),
    # Polls a status: a long job is polled many times while its status changes, which
    # is progress, so the hard cap is 120, not 30. The same status 4 times with nothing
    # else happening is still a stalled repeat (default 3): an agent waiting on a job
    # is told so; give a slow job's poll its own max_repeats.
    "poll": Profile("poll", max_identical_calls=120),
    # Reads and searches: the defaults (a re-read of unchanged content is filler: its
    # outcome is not new, so it never resets another call's count).
    "read": Profile("read"),
    "search": Profile("search"),
    # A scratchpad: new text is not progress, whatever it says.
    "think": Profile("think", progress="none"),
}

# Words of a tool's name that give it a profile, in this order (the first match wins:
# "str_replace_editor" is an edit, "get_job_status" a poll).
DEFAULT_PROFILE_NAMES: dict[ProfileName, tuple[str, ...]] = {
    "think": ("think", "thought", "reflect", "scratchpad", "plan"),
    "edit": (
        "edit", "editor", "write", "replace", "patch", "insert", "create", "delete",
        "remove", "rename", "move", "mkdir", "update",
    ),
    "exec": (
        "bash", "sh", "shell", "terminal", "exec", "execute", "cmd", "command",
        "python", "ipython", "interpreter",
    ),
    "send": ("send", "post", "notify", "email", "mail", "reply", "publish", "sms"),
    "poll": ("poll", "status", "wait", "watch"),
    "search": ("search", "grep", "find", "glob", "query", "lookup", "list", "ls"),
    "read": ("read", "cat", "view", "get", "fetch", "open", "show", "load", "describe"),
}  # fmt: skip

_WORDS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def name_words(tool: str) -> list[str]:
    """``"getJobStatus"`` -> ``["get", "job", "status"]``; ``"run_shell.v2"`` ->
    ``["run", "shell", "v2"]``."""
    return [w.lower() for w in _WORDS.findall(tool)]


def profile_of(
    tool: str, configured: ProfileName | None, names: Mapping[ProfileName, tuple[str, ...]]
) -> Profile | None:
    """The tool's profile: the configured one, else the one its name gives, else None."""
    name = configured if configured is not None else profile_by_name(tool, names)
    return PROFILES[name] if name is not None else None


def profile_by_name(tool: str, names: Mapping[ProfileName, tuple[str, ...]]) -> ProfileName | None:
    words = set(name_words(tool))
    for profile, keys in names.items():
        if not words.isdisjoint(keys):
            return profile
    return None


__all__ = [
    "DEFAULT_PROFILE_NAMES",
    "PROFILES",
    "Profile",
    "ProfileName",
    "Progress",
    "name_words",
    "profile_by_name",
    "profile_of",
]
