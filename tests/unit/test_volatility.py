"""Default volatility (issue 14, classes 1 and 6): outcomes that differ only in what is
fresh on every call (ids the callee mints, timings, process ids, the shell's own line
counter) give one marker, so the repeat is seen; each case has its hard negative
beside it: a real change of similar shape keeps its own marker."""

from __future__ import annotations

from guard.engine.calls import Step
from guard.engine.config import LoopConfig, RedactionConfig
from guard.engine.detector import Detector
from guard.engine.progress import ProgressMarkers
from guard.engine.redact import Redactor

M = ProgressMarkers(LoopConfig(), Redactor(RedactionConfig(), key=b"k"))


def markers(tool: str, outcomes: list[object]) -> set[str]:
    return {M.marker(tool, o) for o in outcomes}


def stopped_at(tool: str, outcomes: list[object]) -> int | None:
    """The 1-based call the default detector stops when the same call keeps
    returning these outcomes, or None."""
    detector = Detector(LoopConfig())
    history: list[Step] = []
    for n, outcome in enumerate(outcomes, start=1):
        if detector.evaluate(history, tool, "p1").action == "block":
            return n
        history.append(Step(tool, "p1", M.marker(tool, outcome)))
    return None


# -- class 1: sends and execs whose results carry fresh ids -----------------------


def _send(n: int) -> dict[str, object]:
    # A chat send (Lark/Feishu-like shape): a new message id, time and receipt per call.
    return {
        "ok": True,
        "data": {
            "messageId": f"om_{17 + n}",
            "chat_id": "oc_team",
            "createdAt": 1764500000 + n,
            "receipt": f"rcpt_{9000 + n}",
        },
        "sessionId": f"sess_{n}",
    }


def test_message_send_loop_is_one_outcome_and_stopped_at_the_fourth_call() -> None:
    sends = [_send(n) for n in range(6)]
    assert len(markers("send_message", sends)) == 1
    assert stopped_at("send_message", sends) == 4


def test_hard_negative_sends_to_different_chats_or_texts_stay_distinct() -> None:
    a, b = _send(1), _send(2)
    b["data"]["chat_id"] = "oc_other"  # type: ignore[index]
    assert M.marker("send_message", a) != M.marker("send_message", b)
    failed = _send(3)
    failed["ok"] = False
    assert M.marker("send_message", failed) != M.marker("send_message", _send(4))


def _exec(n: int, stdout: str = "Build succeeded\n") -> dict[str, object]:
    # An exec tool's JSON result: pid, run id, timings and cwd change on every run.
    return {
        "exit_code": 0,
        "stdout": stdout,
        "stderr": "",
        "pid": 1003 + n * 17,
        "runId": f"run_{n}",
        "startedAt": f"2026-11-30T10:{n:02d}:00Z",
        "durationMs": 812 + n,
        "cwd": "/tmp/tmp-work",
    }


def test_exec_result_with_pid_run_id_and_timing_is_one_outcome() -> None:
    runs = [_exec(n) for n in range(5)]
    assert len(markers("exec", runs)) == 1
    assert stopped_at("exec", runs) == 4


def test_hard_negative_exec_with_different_output_or_exit_code_stays_distinct() -> None:
    assert M.marker("exec", _exec(1)) != M.marker("exec", _exec(2, "Build failed\n"))
    failed = _exec(3)
    failed["exit_code"] = 1
    assert M.marker("exec", failed) != M.marker("exec", _exec(4))


def test_short_ids_and_pids_in_text() -> None:
    texts = [
        f"started run_{n} (pid {1003 + n}) in 0.{40 + n}s\nmessage om_{17 + n} sent"
        for n in range(4)
    ]
    assert len(markers("exec", texts)) == 1
    assert len(markers("exec", [f"PID: {n}\nok" for n in (5, 6, 7)])) == 1
    assert len(markers("exec", [f"<Client object at 0x7f3a2c1b{n:04x}> ok" for n in range(3)])) == 1
    # Slack-style epoch ts in text.
    assert len(markers("send", [f"posted ts=17645000{n:02d}.00{n}200" for n in range(3)])) == 1


def test_hard_negative_counters_that_are_progress_stay_distinct() -> None:
    # A poll whose step counter rises, a countdown in whole seconds, file names with
    # numbers, search results that differ in one id: all real changes.
    assert len(markers("poll", [f"step_{n} of 10 done" for n in (3, 4, 5)])) == 3
    assert len(markers("poll", [f"eta {n}s" for n in (30, 20, 10)])) == 3
    assert len(markers("ls", ["file_1.txt\nfile_2.txt", "file_3.txt\nfile_4.txt"])) == 2
    hits = [
        {"results": [{"id": "doc_11", "title": "A"}]},
        {"results": [{"id": "doc_12", "title": "A"}]},
    ]
    assert len(markers("search", hits)) == 2
    assert len(markers("poll", [{"status": s} for s in ("queued", "running", "done")])) == 3
    # A different traceback line is a different error.
    tb = 'Traceback (most recent call last):\n  File "app.py", line {n}, in main\nKeyError: x'
    assert len(markers("exec", [tb.format(n=n) for n in (10, 42)])) == 2


# -- class 6: the shell's error prefix counts up -----------------------------------


def _bash_cd(line: int) -> str:
    # The shape issue 14 describes from recorded coding-agent runs (the same `cd` until
    # the cost limit; only the line number rises). Written here, not a recorded output.
    return f"/bin/bash: line {line}: cd: /testbed/src/sympy: No such file or directory\n"


def test_shell_line_counter_is_not_progress() -> None:
    outputs = [_bash_cd(13008 + 2 * n) for n in range(6)]
    assert len(markers("bash", outputs)) == 1
    assert stopped_at("bash", outputs) == 4
    # dash's form.
    assert len(markers("bash", [f"sh: {n}: cd: can't cd to /nope" for n in (1, 2, 3)])) == 1


def test_hard_negative_shell_errors_about_different_paths_stay_distinct() -> None:
    other = "/bin/bash: line 13010: cd: /testbed/sympy: No such file or directory\n"
    assert M.marker("bash", _bash_cd(13008)) != M.marker("bash", other)


def test_pytest_timing_line_is_not_progress_but_the_result_is() -> None:
    run = "==== 1 failed, 12 passed in {t}s ====\nFAILED tests/test_x.py::test_{name}"
    same = [run.format(t=t, name="a") for t in ("0.52", "0.61", "1.03")]
    assert len(markers("bash", same)) == 1
    assert M.marker("bash", same[0]) != M.marker("bash", run.format(t="0.52", name="b"))


# -- volatile keys of a profile: ids a send mints are fresh only for sends --------


def _discord_send(n: int) -> dict[str, object]:
    # A create-message answer: the new message's id in a plain "id" key (a short id that
    # no default pattern treats as volatile).
    return {"id": f"K{n}xQ7p", "channel": "eng", "content": "build is red"}


def test_a_send_tools_generic_id_is_volatile_so_the_resend_loop_stops_at_the_fourth() -> None:
    sends = [_discord_send(n) for n in range(6)]
    assert len(markers("post_message", sends)) == 1  # "post" -> the send profile
    assert stopped_at("post_message", sends) == 4


def test_hard_negative_the_same_shape_from_a_search_keeps_its_ids() -> None:
    # A search returning different records: "id" is the content here, not a receipt.
    results = [_discord_send(n) for n in range(6)]
    assert len(markers("search_messages", results)) == 6
    assert stopped_at("search_messages", results) is None


def test_a_configured_profile_brings_its_volatile_keys_to_any_tool_name() -> None:
    cfg = LoopConfig.model_validate({"tools": {"notify_team": {"profile": "send"}}})
    m = ProgressMarkers(cfg, Redactor(RedactionConfig(), key=b"k"))
    sends = [_discord_send(n) for n in range(3)]
    assert len({m.marker("notify_team", s) for s in sends}) == 1
    plain = ProgressMarkers(LoopConfig(profile_names={}), Redactor(RedactionConfig(), key=b"k"))
    assert len({plain.marker("notify_team", s) for s in sends}) == 3  # no profile: kept
