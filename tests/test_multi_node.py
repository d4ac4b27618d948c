"""run_multi_node.sh: the commands it builds, every hostfile error, and real runs on two hosts.

The real hosts are network namespaces on this machine, each with its own address and a key-only
sshd (tests/netns_hosts.py); the launcher reaches them with pdsh over ssh exactly as it would reach
cluster nodes. Those tests skip, with the reason, only where namespaces can't be made.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, SWEEP_SHARED, losses, run_cli, trainer_args
from netns_hosts import Hosts, unavailable

SCRIPT = str(ROOT / "run_multi_node.sh")


def launch(args, env=None, timeout=600, cwd=ROOT):
    proc = subprocess.Popen([SCRIPT, *map(str, args)], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hung launch: end its ssh clients too, which hold the pipes open
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def dry(args, cwd=ROOT, **env):
    res = launch(args, {"DRY_RUN": "1", **env}, cwd=cwd)
    assert res.returncode == 0, res.stderr
    return [line.rstrip() for line in res.stdout.strip().splitlines()]


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nnode-a slots=8\n\n127.0.0.2 slots=8   # the second\nnode-c slots=4\n")
    return path


def test_single_run_calls_the_deepspeed_runner_with_per_node_counts(hostfile):
    (cmd,) = dry([hostfile, 8, 2, "True", "--head_width", "32", "--run_name", "a b"])
    assert cmd.startswith("deepspeed --hostfile HOSTFILE.generated --launcher pdsh --force_multi --no_ssh_check "
                          "--num_nodes 2 "
                          "--num_gpus 8 --master_addr node-a --master_port ")
    assert cmd.endswith("run_trainer.py --head_width 32 --run_name a\\ b")  # flags pass through, quoted
    port = int(cmd.split("--master_port ")[1].split()[0])
    assert 29500 <= port < 31500 and dry([hostfile, 8, 2, "True"])[0].count(f"--master_port {port} ")  # deterministic
    assert "--master_port 29999 " in dry([hostfile, 8, 2, "True"], MASTER_PORT="29999")[0]


def test_torchrun_path_starts_one_rendezvous_per_node(hostfile):
    lines = dry([hostfile, 4, 3, "True", "--head_width", "16"], LAUNCHER="torchrun", BACKEND="ddp")
    assert [line.split()[1] for line in lines] == ["node-a", "127.0.0.2", "node-c"]
    for rank, line in enumerate(lines):
        assert (f"--nnodes 3 --nproc_per_node 4 --node_rank {rank} --rdzv_backend c10d --rdzv_endpoint node-a:"
                in line) and line.endswith("run_trainer.py --backend ddp --head_width 16")
        assert f" --local_addr {line.split()[1]} " in line  # what rank 0's workers are told to reach it at


def test_sweep_mode_hands_the_grid_and_nodes_to_sweep_py(hostfile, tmp_path):
    (tmp_path / "grid").write_text("SWEEP_WIDTHS=32\nSWEEP_LRS=1e-3,2e-3  # two\nSWEEP_STEPS=100,400\n")
    (cmd,) = dry([hostfile, 2, 2, "false", "--seq_len", "64"], SWEEP_FILE=str(tmp_path / "grid"), SWEEP_SEEDS="0,1")
    assert cmd.startswith(f"python3 {ROOT}/scripts/sweep.py --out sweeps/multinode --widths 32 --lrs 1e-3\\,2e-3 "
                          "--parametrizations mup\\,sp --seeds 0\\,1 ")
    assert "--steps 100\\,400 --batch_sizes '' " in cmd  # a length sweep across the nodes
    assert "--hostfile HOSTFILE.generated --slots_per_host 2 -- --seq_len 64" in cmd


@pytest.mark.parametrize("sep,end", [("\n", "\n"), ("\r\n", ""), ("\n", "")])
def test_a_sweep_file_keeps_every_value_exactly_the_last_line_too(hostfile, tmp_path, sep, end):
    """A value keeps its spaces and #, only the spaces around it and a comment (# after a space) go; the last line
    counts without a final newline; a line that is not KEY=VALUE, an empty value, a key given twice: one line."""
    lines = ["# the grid", "SWEEP_WIDTHS = 32 ", "SWEEP_DIR=my sweeps/run#3   # where",
             "SWEEP_PARAMETRIZATIONS='mup'  # q", "SWEEP_LRS=1e-3,2e-3"]
    (tmp_path / "grid").write_bytes((sep.join(lines) + end).encode())
    (cmd,) = dry([hostfile, 2, 2, "false"], SWEEP_FILE=str(tmp_path / "grid"))
    assert "--out my\\ sweeps/run#3 --widths 32 --lrs 1e-3\\,2e-3 --parametrizations mup " in cmd, cmd
    for text, message in [("SWEEP_LRS\n", "line 1: expected KEY=VALUE, got 'SWEEP_LRS'"),
                          ("SWEEP_WIDTHS=8\nSWEEP_LRS=  # none\n", "line 2: SWEEP_LRS has no value"),
                          ("SWEEP_LRS=1e-3\nSWEEP_LRS=2e-3", "line 2: SWEEP_LRS is given twice (first on line 1)"),
                          ("SWEEP_DIR=\"a b\n", "line 1: the value of SWEEP_DIR opens a quote it does not close"),
                          ("SWEEP_LR=1e-3\n", "line 1: unknown key 'SWEEP_LR'")]:
        (tmp_path / "bad").write_text(text)
        res = launch([hostfile, 2, 2, "false"], {"DRY_RUN": "1", "SWEEP_FILE": str(tmp_path / "bad")})
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


def test_an_empty_sweep_variable_is_passed_on_not_replaced_by_the_default(hostfile):
    (cmd,) = dry([hostfile, 1, 1, "false"], SWEEP_DIR="", SWEEP_LRS="")
    assert " --out '' " in cmd and " --lrs '' " in cmd  # sweep.py refuses both in one line


def test_secrets_are_forwarded_but_never_printed(hostfile):
    res = launch([hostfile, 8, 1, "True"], {"DRY_RUN": "1", "WANDB_API_KEY": "s3cret-value",
                                            "NCCL_SOCKET_IFNAME": "eth0"})
    assert res.returncode == 0 and "s3cret-value" not in res.stdout + res.stderr
    assert "WANDB_API_KEY" in res.stderr and "NCCL_SOCKET_IFNAME" in res.stderr  # the names only
    assert " --venv_script /tmp/mupgpt-secrets." in res.stdout  # a file each node sources, not an export


HOSTFILE_ERRORS = {
    "node-a slots=8\nnode-a slots=8\n": "listed twice",
    "node-a slots=8\nnode-b slots=4\n": "fewer than NGPU_PER_NODE=8",
    "node-a slots=8\n": "fewer than NUM_NODES=2",
    "node-a slots=8\nnode-b\n": "expected 'host slots=N'",
    "node-a slots=8\nnode-b slots=eight\n": "expected 'host slots=N'",
    "node-a slots=8\n$(reboot) slots=8\n": "is not a plain host name or address",
    "node-a slots=8\nuser@node-b slots=8\n": "is not a plain host name or address",
    "node-a slots=8\n-oProxyCommand=x slots=8\n": "is not a plain host name or address",
    "node-a slots=8\r\nnode-a slots=8\r\n": "listed twice",  # CRLF lines are read like LF ones
}


def test_a_crlf_hostfile_is_read_like_an_lf_one(tmp_path):
    (tmp_path / "hf").write_bytes(b"# windows\r\nnode-a slots=8\r\nnode-b slots=8\r\n")
    assert dry([tmp_path / "hf", 8, 2, "True"])[0].startswith(
        "deepspeed --hostfile HOSTFILE.generated --launcher pdsh --force_multi --no_ssh_check --num_nodes 2 "
        "--num_gpus 8 --master_addr node-a --master_port ")


def test_help_prints_the_usage_and_exits_0():
    for flag in ("--help", "-h"):
        res = launch([flag])
        assert res.returncode == 0 and "HOSTFILE NGPU_PER_NODE NUM_NODES SINGLE_RUN" in res.stdout
        assert "LAUNCHER=deepspeed|torchrun" in res.stdout and not res.stderr


@pytest.mark.parametrize("text", HOSTFILE_ERRORS, ids=range(len(HOSTFILE_ERRORS)))
def test_hostfile_errors_are_one_line_and_exit_2(tmp_path, text):
    (tmp_path / "hf").write_text(text)
    res = launch([tmp_path / "hf", 8, 2, "True"], {"DRY_RUN": "1"})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and HOSTFILE_ERRORS[text] in res.stderr, res.stderr


@pytest.mark.parametrize("args,message", [
    (["hostfile.example", "0", "2", "True"], "NGPU_PER_NODE must be a positive integer"),
    (["hostfile.example", "8", "x", "True"], "NUM_NODES must be a positive integer"),
    (["hostfile.example", "8", "2", "maybe"], "SINGLE_RUN must be True or False"),
    (["/nonexistent", "8", "2", "True"], "not found"),
    (["hostfile.example"], "usage:"),
    (["hostfile.example", "8", "2", "True", "--seed", "1"], "MASTER_PORT must be a port number"),
    (["hostfile.example", "8", "2", "True"], "BACKEND must be fsdp or ddp"),
])
def test_argument_errors_are_one_line_and_exit_2(args, message):
    env = {"MASTER_PORT": "70000"} if "MASTER_PORT" in message else {"BACKEND": "dp"} if "BACKEND" in message else {}
    res = launch(args, {"DRY_RUN": "1", **env})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr


@pytest.mark.parametrize("folder", ["check out", "100%"])
def test_a_checkout_path_the_deepspeed_runner_cannot_pass_is_refused(tmp_path, hostfile, folder):
    """DeepSpeed's pdsh runner writes `cd <checkout>;` unquoted into the remote line (and pdsh reads % there)."""
    (tmp_path / folder).mkdir()
    script = shutil.copy(SCRIPT, tmp_path / folder)
    res = subprocess.run([script, hostfile, "8", "2", "True"], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"the path '{tmp_path / folder}' has a character" in res.stderr and "LAUNCHER=torchrun" in res.stderr
    torchrun = subprocess.run([script, hostfile, "8", "2", "True"],
                              env={**os.environ, "DRY_RUN": "1", "LAUNCHER": "torchrun"},
                              capture_output=True, text=True, timeout=120)
    assert torchrun.returncode == 0, torchrun.stderr


@pytest.mark.skipif(not shutil.which("ssh"), reason="needs the ssh client: apt-get install openssh-client")
def test_unreachable_nodes_are_named_before_anything_starts(tmp_path):
    (tmp_path / "hf").write_text("127.0.0.2 slots=4\n127.0.0.3 slots=4\n")  # loopback, no sshd there
    res = launch([tmp_path / "hf", 4, 2, "True"], {"SSH_ARGS": "-o ConnectTimeout=2"}, timeout=120)
    assert res.returncode == 2 and "passwordless ssh failed to: 127.0.0.2 127.0.0.3" in res.stderr, res.stderr


# ---- real hosts -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hosts():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    made = Hosts(2)
    yield made
    made.close()


def host_env(hosts):
    return {"SSH_ARGS": hosts.ssh_args, "GLOO_SOCKET_IFNAME": "mupnet", "OMP_NUM_THREADS": "1"}


FLAGS = ["--n_layer", "2", "--max_steps", "8", "--precision", "fp32", "--zero_stage", "3"]


SECRET = "some-secret-4f1c"


class Watch(threading.Thread):
    """Samples every process's command line while a launch runs, and the trainers' environments."""

    def __init__(self, mark):
        super().__init__(daemon=True)
        self.mark = str(mark)  # a trainer of this test has it on its command line (others may be running)
        self.stop, self.cmdlines, self.trainer_env, self.sweep_env = threading.Event(), set(), {}, []
        self.secret_files = []  # (the ranks running, the secrets files on the nodes then): one per sample

    def run(self):
        while not self.stop.is_set():
            ranks = set()
            for proc in glob.glob("/proc/[0-9]*"):
                try:
                    argv = open(f"{proc}/cmdline", "rb").read().decode(errors="replace").split("\0")
                    cmdline = " ".join(argv)
                    self.cmdlines.add(cmdline)
                    if (os.path.basename(argv[0]).startswith("python")
                            and any(a.endswith("run_trainer.py") for a in argv[1:3])
                            and self.mark in cmdline):  # a trainer itself (not ssh, a shell or torchrun)
                        env = dict(kv.split("=", 1) for kv in open(f"{proc}/environ", "rb").read().decode(
                            errors="replace").split("\0") if "=" in kv)
                        if "RANK" in env:
                            self.trainer_env[env["RANK"]] = env
                            ranks.add(env["RANK"])
                        else:  # a sweep's single-process run
                            self.sweep_env.append((cmdline, env))
                except OSError:  # gone, or a kernel thread
                    pass
            files = [f for f in glob.glob("/tmp/mupgpt-secrets.*/*") if os.path.dirname(f) not in self.before]
            self.secret_files.append((ranks, files))  # the hosts share this /tmp
            time.sleep(0.05)

    def __enter__(self):
        self.before = set(glob.glob("/tmp/mupgpt-secrets.*"))  # another launch's (a concurrent test run) are not ours
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


# pdsh replaces %n, %h, %u and %% in the remote command (a lone % at the end reads past it)
PERCENT = "%n%h%u%%x%"


def hostile_env(tmp_path):
    """A secret, and forwarded values that run commands if a shell on a node ever evaluates them (or pdsh changes)."""
    return {"WANDB_API_KEY": SECRET, "WANDB_NOTES": f"a b $(touch {tmp_path}/pwned-env) `touch {tmp_path}/pwned-bq`",
            "WANDB_TAGS": f"$(touch${{IFS}}{tmp_path}/pwned-nospace)\"'\\", "WANDB_RUN_GROUP": PERCENT,
            "WANDB_JOB_TYPE": f"a {PERCENT} b"}


def assert_nothing_ran_and_secret_hidden(tmp_path, res, watch, ranks=("0", "1")):
    assert not list(tmp_path.glob("pwned*")), "a forwarded value or trainer flag ran as a command on a node"
    assert SECRET not in res.stdout + res.stderr
    assert watch.cmdlines and not [c for c in watch.cmdlines if SECRET in c]
    assert not set(glob.glob("/tmp/mupgpt-secrets.*")) - watch.before, "the secret file was left on a node"
    env = hostile_env(tmp_path)
    assert sorted(watch.trainer_env) == list(ranks), watch.trainer_env.keys()  # every rank seen (one per host)
    for rank_env in watch.trainer_env.values():  # every value arrives exactly as set
        assert all(rank_env.get(k) == v for k, v in env.items()), {k: rank_env.get(k) for k in env}


def test_real_hosts_pass_the_ssh_check_and_only_the_dead_one_is_named(hosts, tmp_path):
    (tmp_path / "hf").write_text(f"{hosts.addresses[0]} slots=1\n127.0.0.2 slots=1\n{hosts.addresses[1]} slots=1\n")
    res = launch([tmp_path / "hf", 1, 3, "True"], {"SSH_ARGS": hosts.ssh_args}, timeout=120)
    assert res.returncode == 2 and "passwordless ssh failed to: 127.0.0.2 (check keys" in res.stderr, res.stderr


def test_two_hosts_train_like_one_host_with_two_ranks(hosts, tmp_path, corpus, data_dir):
    # the output folder and a forwarded value would each run `touch` on every node if a shell there evaluated them,
    # and their %n, %h, %u, %% would change if pdsh's substitution reached them
    out = tmp_path / f"out $(touch {tmp_path}/pwned-arg)'\"{PERCENT}"
    data = tmp_path / f"data{PERCENT}"  # a flag the pdsh runner passes unquoted
    data.symlink_to(data_dir)
    args = trainer_args(out, corpus, data, *FLAGS)
    with Watch(tmp_path) as watch:
        res = launch([hosts.hostfile(tmp_path / "hf"), 1, 2, "True", *args, "--run_name", "two_hosts"],
                     {**host_env(hosts), **hostile_env(tmp_path)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "10.77.0.1: " in res.stdout and "10.77.0.2: " in res.stdout  # ranks ran on both hosts
    assert_nothing_ran_and_secret_hidden(tmp_path, res, watch)
    # the trainers have the secret (above), and while they run its file is gone from both nodes already
    training = [files for ranks, files in watch.secret_files if ranks == {"0", "1"}]
    assert training and not any(training), [f for f in training if f][:1]
    # the reference on this host under torchrun: the same DeepSpeed engine, fewer processes to start
    one = run_cli([*args, "--backend", "deepspeed", "--run_name", "one_host"],
                  launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", "29671"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert losses(out / "two_hosts") == pytest.approx(losses(out / "one_host"), rel=1e-5)  # the folder, literally


def test_one_node_runs_there_over_pdsh_with_flags_as_typed(hosts, tmp_path):
    # NUM_NODES=1: on the hostfile's node (not here) and through the same quoting; the trainer names what it got
    missing = tmp_path / f"no 'such' corpus{PERCENT}"
    res = launch([hosts.hostfile(tmp_path / "hf"), 1, 1, "True", "--dataset", missing, "--max_steps", "1"],
                 host_env(hosts), timeout=60)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"10.77.0.1: error: no such file or folder: {missing}: " in res.stdout, res.stdout[-3000:]


def test_torchrun_two_hosts_train_like_one_host_with_two_ranks(hosts, tmp_path, corpus, data_dir):
    out = tmp_path / f"out $(touch {tmp_path}/pwned-arg)'\"{PERCENT}"
    args = trainer_args(out, corpus, data_dir, "--max_steps", "4")
    with Watch(tmp_path) as watch:
        res = launch([hosts.hostfile(tmp_path / "hf"), 1, 2, "True", *args, "--run_name", "two_hosts"],
                     {**host_env(hosts), **hostile_env(tmp_path), "LAUNCHER": "torchrun",
                      "BACKEND": "ddp"}, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "10.77.0.1: " in res.stdout and "10.77.0.2: " in res.stdout
    assert_nothing_ran_and_secret_hidden(tmp_path, res, watch)
    one = run_cli([*args, "--backend", "ddp", "--run_name", "one_host"],
                  launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            "29673"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert losses(out / "two_hosts") == pytest.approx(losses(out / "one_host"), rel=1e-5)
    assert json.loads((out / "two_hosts" / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("launcher,env,first_line", [
    ("torchrun", {"LAUNCHER": "torchrun", "BACKEND": "fsdp"}, "fsdp (2 replicas, each sharded over 2) | 4 rank(s)"),
    ("deepspeed", {}, "deepspeed (2 replicas, each sharded over 2) | 4 rank(s)"),
])
def test_hybrid_sharding_over_two_hosts_trains_like_one_process(hosts, tmp_path, corpus, data_dir, launcher, env,
                                                                first_line):
    # 2 hosts x 2 ranks, sharding within each host (--shard_group_size 2) and replicating across them:
    # FSDP2's 2-D mesh under torchrun, ZeRO-3 with ZeRO++'s hpZ under the DeepSpeed runner
    out = tmp_path / "out"
    args = trainer_args(out, corpus, data_dir, "--max_steps", "4", "--train_batch_size", "16")
    res = launch([hosts.hostfile(tmp_path / "hf", slots=2), 2, 2, "True", *args, "--shard_group_size", "2",
                  "--run_name", "hybrid"], {**host_env(hosts), **env}, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert first_line in res.stdout, res.stdout[-3000:]
    if launcher == "deepspeed":
        zero = json.loads((out / "hybrid" / "ds_config.json").read_text())["zero_optimization"]
        assert zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 2
    one = run_cli([*args, "--run_name", "one_process"])
    assert one.returncode == 0, one.stderr[-2000:]
    assert losses(out / "hybrid") == pytest.approx(losses(out / "one_process"), abs=1e-5)


def test_sweep_mode_runs_a_grid_across_both_hosts(hosts, tmp_path, corpus, data_dir):
    """Launched from a folder of the user's with a relative --dataset and SWEEP_DIR: both mean that folder's, on
    every host, and the sweep folder is made there, not in the checkout."""
    env = {**host_env(hosts), **hostile_env(tmp_path), "SWEEP_DIR": "sweep", "SWEEP_WIDTHS": "8,16",
           "SWEEP_LRS": "2e-3", "SWEEP_PARAMETRIZATIONS": "mup,sp"}
    data = tmp_path / f"data{PERCENT}"
    data.symlink_to(data_dir)
    (tmp_path / "mytexts").symlink_to(corpus)
    with Watch(tmp_path) as watch:
        res = launch([hosts.hostfile(tmp_path / "hf"), 1, 2, "False", *SWEEP_SHARED, "--max_steps", "5",
                      "--base_head_width", "8", "--dataset", "./mytexts", "--data_dir", data], env, cwd=tmp_path)
    assert not (ROOT / "sweep").exists()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert not list(tmp_path.glob("pwned*")) and SECRET not in res.stdout + res.stderr
    assert not [c for c in watch.cmdlines if SECRET in c]
    trainers = [e for c, e in watch.sweep_env if "run_trainer.py" in c]
    assert trainers and all(all(e.get(k) == v for k, v in hostile_env(tmp_path).items()) for e in trainers)
    assert all(f" --data_dir {data} " in c for c, e in watch.sweep_env if "run_trainer.py" in c)  # % and all
    rows = [json.loads(line) for line in open(tmp_path / "sweep" / "results.jsonl")]
    assert len(rows) == 4 and all(r["steps"] == 5 for r in rows)
    ran_on = {line.split(" on ")[1].split(":")[0] for line in res.stdout.splitlines() if ": done" in line}
    assert ran_on == set(hosts.addresses)


def test_stopping_a_sweep_stops_its_runs_on_the_nodes(hosts, tmp_path, corpus, data_dir):
    """SIGTERM to the launcher's sweep: each run on a node gets SIGTERM there (through ssh's closed stdin), saves
    a checkpoint and stops; nothing is left running on the nodes."""
    env = {**host_env(hosts), "SWEEP_DIR": str(tmp_path / "sweep"), "SWEEP_WIDTHS": "8", "SWEEP_LRS": "1e-3,2e-3",
           "SWEEP_PARAMETRIZATIONS": "mup"}
    proc = subprocess.Popen([SCRIPT, hosts.hostfile(tmp_path / "hf"), "1", "2", "False", *SWEEP_SHARED, "--max_steps",
                             "100000", "--base_head_width", "8", "--dataset", str(corpus), "--data_dir", str(data_dir),
                             # quiet: the signal lands in training
                             "--log_interval", "100000", "--save_interval", "10"],
                            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    logs = tmp_path / "sweep" / "runs"
    deadline = time.time() + 300
    while time.time() < deadline and len({p.parent.parent for p in logs.glob("*/checkpoints/step_*")}) < 2:
        time.sleep(0.5)
    sweep = [p for p in map(int, subprocess.run(["pgrep", "-f", "scripts/sweep.py --out " + str(tmp_path)],
                                                capture_output=True, text=True).stdout.split())]
    assert len(sweep) == 1
    os.kill(sweep[0], signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "run the same command again to continue" in err, out + err
    tails = [p.read_text()[-500:] for p in logs.glob("*.log")]
    assert all("stopped at step" in p.read_text() for p in logs.glob("*.log")), tails
    assert not subprocess.run(["pgrep", "-f", f"--output_dir {tmp_path}"], capture_output=True).stdout


def test_a_dead_node_stops_the_launcher_promptly_and_the_run_resumes(hosts, tmp_path, corpus, data_dir):
    args = trainer_args(tmp_path, corpus, data_dir, "--n_layer", "2", "--precision", "fp32", "--zero_stage", "3",
                        "--save_interval", "10", "--run_name", "r")
    proc = subprocess.Popen([SCRIPT, hosts.hostfile(tmp_path / "hf"), "1", "2", "True", *args, "--max_steps", "5000"],
                            cwd=ROOT, env={**os.environ, **host_env(hosts)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 25):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the node could die"
    hosts.kill(1)  # the second node dies: its ranks and its sshd
    killed = time.time()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        hosts.start_sshd(1)
    assert time.time() - killed < 90 and proc.returncode != 0
    assert "unreachable node(s): 10.77.0.2" in err and "--resume auto" in err, err[-2000:]
    last = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir() if not p.name.endswith(".tmp"))[-1]
    step = int(last.split("_")[1])
    deadline = time.time() + 20
    while time.time() < deadline and not hosts.reachable(1):
        time.sleep(0.2)
    res = launch([tmp_path / "hf", 1, 2, "True", *args, "--max_steps", str(step + 3), "--resume", "auto"],
                 host_env(hosts))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert f"resumed from {tmp_path / 'r' / 'checkpoints' / last} at step {step}" in res.stdout
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == step + 3


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_relative_path_in_a_single_run_means_the_launch_folder(tmp_path, hostfile, launcher):
    """The nodes run the trainer in the checkout: a relative path typed in the launch folder is made absolute
    there. A --dataset that names nothing here (stdlib, a hub name) stays as typed."""
    (tmp_path / "mytexts").mkdir()
    lines = "\n".join(dry([hostfile, 8, 2, "True", "--dataset", "./mytexts", "--output_dir", "out", "--data_dir=d",
                           "--resume", "auto", "--config", "c.toml"], cwd=tmp_path, LAUNCHER=launcher))
    for path in (tmp_path / "mytexts", tmp_path / "out", tmp_path / "d", tmp_path / "c.toml"):
        assert str(path) in lines, lines
    assert "--resume auto" in lines.replace("'", ""), lines
    hub = "\n".join(dry([hostfile, 8, 2, "True", "--dataset", "org/corpus"], cwd=tmp_path, LAUNCHER=launcher))
    assert f"{tmp_path}/org/corpus" not in hub and "org/corpus" in hub, hub
