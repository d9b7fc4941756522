"""The progress display of the CLIs: plain lines off a terminal, rich bars on one."""

from __future__ import annotations

import io

from fedbus.demo import Progress
from fedbus.progress import RunProgress
from fedbus.protocol.messages import RoundClose


def _close(round_: int, acc: float) -> RoundClose:
    return RoundClose(round=round_, model_version=round_, status="aggregated", accepted=["w1", "w2"], seconds=0.25,
                      metrics={"test_accuracy": acc})


def test_off_a_terminal_every_event_is_one_plain_line():
    out = io.StringIO()
    p = Progress(3, stream=out, target=0.9)
    p.workers_ready(1, 2, 0.5)  # not all ready yet: nothing to say off a terminal
    p.workers_ready(2, 2, 1.25)
    p.round_closed(_close(1, 0.8))
    p.round_closed(_close(2, 0.95))
    p.finished()
    assert out.getvalue().splitlines() == [
        "all 2 workers ready after 1.2 s (heartbeats verified)",
        "round 1: aggregated model v1 test acc 0.800 in 250 ms, 2 updates",
        "round 2: aggregated model v2 test acc 0.950 in 250 ms, 2 updates",
    ]
    assert p.reached is not None and p.reached.round == 2


def test_on_a_terminal_the_rounds_are_a_bar():
    out = io.StringIO()
    display = RunProgress(out, tty=True)
    display.add("rounds", 5, "rounds")
    display.update("rounds", 3, detail="test acc 0.912", line="never printed on a terminal")
    display.note("a note above the bars")
    display.stop()
    text = out.getvalue()
    assert "3/5" in text and "test acc 0.912" in text and "━" in text and "a note above the bars" in text
    assert "never printed" not in text


def test_quiet_prints_nothing():
    out = io.StringIO()
    p = Progress(3, stream=out, quiet=True, target=0.5)
    p.round_closed(_close(1, 0.8))
    p.note("x")
    p.finished()
    assert out.getvalue() == "" and p.reached is not None
