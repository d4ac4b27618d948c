"""Every entry point's --help documents every option, once: no option without help, no '(default: )'."""
import contextlib
import io
import re
import runpy
import sys

import pytest

from conftest import ROOT

ENTRY_POINTS = ["run_trainer.py", "bench/bench.py",
                *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.py"))]


def help_text(script, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert e.value.code == 0
    return out.getvalue()


def option_entries(text):
    """(invocation, help) for each option or positional of argparse's help listing."""
    entries, current = [], None
    for line in text.splitlines():
        if re.match(r"^  \S", line):  # an option or positional starts here
            invocation, _, rest = line.strip().partition("  ")
            current = [invocation, rest.strip()]
            entries.append(current)
        elif current and re.match(r"^\s{3,}\S", line):
            current[1] = (current[1] + " " + line.strip()).strip()
        else:
            current = None
    return [tuple(e) for e in entries if not e[0].startswith("-h")]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_every_option_has_help_and_one_default(script, monkeypatch):
    text = help_text(script, monkeypatch)
    entries = option_entries(text)
    assert entries, text
    undocumented = [inv for inv, help in entries if not help]
    assert not undocumented, f"{script}: no help for {undocumented}"
    assert "(default: )" not in text, text
    twice = [inv for inv, help in entries if help.count("default:") > 1]
    assert not twice, f"{script}: the default said twice for {twice}"
