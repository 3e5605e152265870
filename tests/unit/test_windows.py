from __future__ import annotations

from tuneline.monitoring.windows import next_window, prompt_of


def rows(n: int, start: int = 1, ts: float = 1000.0) -> list[dict]:
    return [{"id": i, "ts": ts + i, "prompt": f"p{i}", "status": 200} for i in range(start, start + n)]


def test_full_window_has_a_stable_id() -> None:
    w = next_window(rows(25), now=2000.0, window_requests=20, window_minutes=60)
    assert w is not None and w.id == "1-20" and w.reason == "full" and len(w.prompts) == 20
    assert next_window(rows(25), now=2000.0, window_requests=20, window_minutes=60).id == w.id


def test_no_window_until_enough_requests_or_time() -> None:
    assert next_window(rows(15), now=1100.0, window_requests=20, window_minutes=60) is None
    late = next_window(rows(15), now=1000.0 + 3601, window_requests=20, window_minutes=60)
    assert late is not None and late.reason == "timeout" and late.id == "1-15"
    assert next_window(rows(5), now=99999.0, window_requests=20, window_minutes=60) is None  # too few


def test_failed_requests_and_conversations() -> None:
    bad = {"id": 1, "ts": 1.0, "prompt": "x", "status": 422}
    conv = {"id": 2, "ts": 2.0, "prompt": None, "status": 200,
            "messages_json": '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},'
                             ' {"role": "user", "content": "c"}]'}
    assert prompt_of(bad) is None and prompt_of(conv) == "c"


def test_cursor_moves_past_failed_requests_without_a_window() -> None:
    from tuneline.monitoring.windows import plan_window

    failed = [{"id": i, "ts": 1000.0 + i, "prompt": f"p{i}", "status": 500} for i in range(1, 31)]
    plan = plan_window(failed, last_id=0, now=2000.0, window_requests=20, window_minutes=60)
    assert plan.window is None and plan.cursor == 30 and plan.skipped == 30 and "failed" in plan.reason
    # failed rows, then a few usable ones: the cursor stops right before the first usable row
    mixed = failed + rows(5, start=31)
    plan = plan_window(mixed, last_id=0, now=1100.0, window_requests=20, window_minutes=60)
    assert plan.window is None and plan.cursor == 30 and "5 usable" in plan.reason
    # enough usable ones after the failures: a window, and the cursor moves to its end
    plan = plan_window(failed + rows(25, start=31), last_id=0, now=1100.0, window_requests=20, window_minutes=60)
    assert plan.window is not None and plan.window.id == "31-50" and plan.cursor == 50 and plan.skipped == 30
    assert plan_window([], last_id=7, now=0.0, window_requests=20, window_minutes=60).cursor == 7
