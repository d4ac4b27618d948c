"""Two (or more) real hosts on this machine: network namespaces on a bridge, each with its own sshd.

Host i gets address 10.77.0.(i+1) on an interface named `mupnet` (the same name in every namespace,
so GLOO_SOCKET_IFNAME=mupnet works everywhere); this machine reaches them over the bridge at
10.77.0.254. Login is by a generated key only. Everything made is removed on close().
"""
import os
import shutil
import subprocess
import tempfile
import time

SUBNET = "10.77.0"
BRIDGE = "mupbr0"


def sh(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def unavailable():
    """Why the hosts can't be made here, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    for tool in ("ip", "pdsh", "ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install iproute2 pdsh openssh-client)"
    if not os.path.exists("/usr/sbin/sshd"):
        return "sshd is not installed (apt-get install openssh-server)"
    probe = sh("ip", "netns", "add", "mupgpt-probe", check=False)
    sh("ip", "netns", "del", "mupgpt-probe", check=False)
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    return None


class Hosts:
    def __init__(self, n=2):
        self.n = n
        self.dir = tempfile.mkdtemp(prefix="mupgpt-hosts-")
        self.key = os.path.join(self.dir, "id_ed25519")
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(n)]
        self.ssh_args = (f"-i {self.key} -o IdentitiesOnly=yes -o StrictHostKeyChecking=no "
                         f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR")
        try:
            self._up()
        except BaseException:
            self.close()
            raise

    def ns(self, i):
        return f"mupgpt-h{i}"

    def _up(self):
        self.close(quiet=True)  # leftovers of a run that was killed
        os.makedirs("/run/sshd", exist_ok=True)
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.key)
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i in range(self.n):
            ns = self.ns(i)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"mupv{i}", "type", "veth", "peer", "name", f"mupp{i}")
            sh("ip", "link", "set", f"mupp{i}", "netns", ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", f"mupp{i}", "name", "mupnet")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.addresses[i]}/24", "dev", "mupnet")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "mupnet", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            sh("ip", "link", "set", f"mupv{i}", "master", BRIDGE, "up")
            self.start_sshd(i)
        deadline = time.time() + 20
        while time.time() < deadline and not all(self.reachable(i) for i in range(self.n)):
            time.sleep(0.2)
        if not all(self.reachable(i) for i in range(self.n)):
            raise RuntimeError(f"sshd in the test hosts did not answer; see {self.dir}/sshd*.log")

    def start_sshd(self, i):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(self.dir, f"hostkey{i}"), check=False)
        config = os.path.join(self.dir, f"sshd{i}.conf")
        with open(config, "w") as f:
            f.write(f"ListenAddress {self.addresses[i]}\nPort 22\nHostKey {self.dir}/hostkey{i}\n"
                    f"AuthorizedKeysFile {self.dir}/authorized_keys\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
                    f"UsePAM no\nStrictModes no\nPidFile {self.dir}/sshd{i}.pid\nMaxStartups 100\nMaxSessions 100\n")
        log = os.path.join(self.dir, f"sshd{i}.log")
        sh("ip", "netns", "exec", self.ns(i), "/usr/sbin/sshd", "-f", config, "-E", log)

    def reachable(self, i):
        return subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=2", *self.ssh_args.split(),
                               self.addresses[i], "true"], capture_output=True).returncode == 0

    def kill(self, i):
        """The host dies: every process in its namespace, sshd included, is killed."""
        pids = sh("ip", "netns", "pids", self.ns(i), check=False).stdout.split()
        if pids:
            sh("kill", "-9", *pids, check=False)

    def hostfile(self, path, slots=1):
        with open(path, "w") as f:
            f.write("# test hosts (network namespaces)\n")
            f.writelines(f"{a} slots={slots}\n" for a in self.addresses)
        return path

    def close(self, quiet=False):
        for i in range(self.n):
            self.kill(i)
            sh("ip", "netns", "del", self.ns(i), check=False)
            sh("ip", "link", "del", f"mupv{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        if not quiet:
            shutil.rmtree(self.dir, ignore_errors=True)
