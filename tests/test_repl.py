"""`edgeact run --chat`'s interactive loop: turns reuse the cache, Ctrl-C stops only the reply."""
from __future__ import annotations

import io
import re

import pytest


@pytest.fixture(scope="module")
def smollm2(smollm2_int4_dir):
    import edgeact

    return edgeact.load(smollm2_int4_dir, threads=1)


class InterruptingOut(io.StringIO):
    """Raises KeyboardInterrupt (as Ctrl-C would) on the n-th streamed piece of the reply to the
    prompt `during` (counted from that reply's start, so it lands inside it whatever the text)."""

    def __init__(self, at: int, during: str):
        super().__init__()
        self.pieces, self.at, self.during, self.armed = 0, at, during, False

    def read_line(self, lines):
        line = next(lines)
        self.armed, self.pieces = line == self.during, 0
        return line

    def write(self, s):
        if self.armed and not s.startswith((">", "(", "edgeact", "last", "session", "\n", " [")):
            self.pieces += 1
            if self.pieces == self.at:
                self.armed = False
                raise KeyboardInterrupt
        return super().write(s)


def test_chat_loop_turns_reuse_the_cache_and_survive_ctrl_c(smollm2):
    from edgeact.repl import chat_loop

    lines = iter(["What is the capital of France?", "/stats", "And of Italy?", "/stats", "/reset", "/bogus",
                  "Tell me a story.", "Hello", "/stats", "/quit"])
    out = InterruptingOut(at=5, during="Tell me a story.")
    rc = chat_loop(smollm2, dict(max_new_tokens=24), input_fn=lambda _: out.read_line(lines), out=out)
    text = out.getvalue()
    assert rc == 0
    cached = [int(re.search(r"last reply: (\d+) prompt tokens from the cache", l).group(1))
              for l in text.splitlines() if "last reply:" in l]
    assert cached[0] == 0 and cached[1] > 0  # the second turn reused the first
    assert "(conversation cleared)" in text and "unknown command /bogus" in text
    assert "[stopped]" in text
    assert cached[2] > 0  # the turn after the stopped one reused it


def test_run_without_prompt_needs_chat(tmp_path):
    from edgeact.cli import main

    assert main(["run", str(tmp_path)]) == 2
