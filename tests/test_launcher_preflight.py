"""run_multi_node.sh checks every node's passwordless ssh in parallel, each check bounded, before anything starts.

The scale test stands a script in for ssh (hosts named slow* hang, dead* refuse, the rest answer after
0.2 s): 512 real nodes are not available here. The same check against real sshd hosts is in
test_multi_node.py.
"""
import os
import subprocess
import time

import pytest

from conftest import ROOT

SCRIPT = str(ROOT / "run_multi_node.sh")

STAND_IN = """#!/bin/sh
for a; do [ "$a" = true ] && break; host=$a; done
echo "$host" >> "$(dirname "$0")/asked"
case "$host" in slow*) exec sleep 600 ;; dead*) exit 255 ;; *) exec sleep 0.2 ;; esac
"""


def launch(tmp_path, hosts, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(STAND_IN)
    (bin_dir / "ssh").chmod(0o755)
    (tmp_path / "hf").write_text("".join(f"{h} slots=8\n" for h in hosts))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    start = time.monotonic()
    res = subprocess.run([SCRIPT, tmp_path / "hf", "8", str(len(hosts)), "True"], env=env, capture_output=True,
                         text=True, timeout=300)
    asked = bin_dir / "asked"
    return res, time.monotonic() - start, asked.read_text().split() if asked.exists() else []


def test_512_hosts_are_checked_in_parallel_and_the_slow_and_dead_ones_named(tmp_path):
    hosts = [f"node{i:03d}" for i in range(512)]
    hosts[100], hosts[400] = "slow-node", "dead-node"
    res, seconds, asked = launch(tmp_path, hosts, SSH_TIMEOUT="5")
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.strip() == ("error: passwordless ssh failed to: slow-node (no answer in 5 s) dead-node "
                                  "(check keys, sshd and 'ssh -o BatchMode=yes HOST true')")
    assert sorted(asked) == sorted(hosts)  # every node checked once
    # one at a time, 510 answers of 0.2 s and the slow node's 5 s take at least 107 s
    assert seconds < 100, f"{seconds:.0f} s: the checks did not run in parallel"


def test_at_most_ssh_parallel_checks_run_at_once(tmp_path):
    # one at a time: the slow node's 2 s bound, then ten answers of 0.2 s; all at once it would be about 2 s
    res, seconds, asked = launch(tmp_path, ["slow-a", *"bcdefghijk"], SSH_TIMEOUT="2", SSH_PARALLEL="1")
    assert res.returncode == 2 and "slow-a (no answer in 2 s)" in res.stderr, res.stderr
    assert len(asked) == 11 and seconds >= 3.9, f"{seconds:.1f} s: more than one check ran at once"


@pytest.mark.parametrize("name, value", [("SSH_PARALLEL", "0"), ("SSH_TIMEOUT", "soon")])
def test_bad_check_settings_are_one_line_and_exit_2(tmp_path, name, value):
    res, _, asked = launch(tmp_path, ["a"], **{name: value})
    assert res.returncode == 2 and res.stderr.startswith(f"error: {name} must be a positive integer"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and asked == []
