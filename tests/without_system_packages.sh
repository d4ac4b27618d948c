#!/usr/bin/env bash
# Runs a command as on a machine without the optional system packages the README names (pdsh, sshd, the ssh
# client, iproute2's ip, libaio), to check that the suite passes there with those tests skipped:
#
#   sudo tests/without_system_packages.sh python3 -m pytest -q -rs tests/test_multi_node.py tests/test_sharded.py
#
# The files are deleted only inside a private mount namespace, from overlays of /usr/bin, /usr/sbin,
# /usr/lib/x86_64-linux-gnu and /usr/include; nothing outside it changes. KEEP_SSH=1 keeps the ssh client and
# ip (openssh-client and iproute2 are common where sshd and pdsh are not). Needs root and overlayfs.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
layers=$(mktemp -d /tmp/without-packages.XXXXXX)
export LAYERS=$layers
unshare -m --propagation private bash -c '
set -e
for d in /usr/bin /usr/sbin /usr/lib/x86_64-linux-gnu /usr/include; do
  n=$LAYERS/$(echo "$d" | tr / _); mkdir -p "$n/upper" "$n/work"
  mount -t overlay overlay -o "lowerdir=$d,upperdir=$n/upper,workdir=$n/work" "$d"
done
rm -f /usr/bin/pdsh /usr/sbin/sshd /usr/include/libaio.h /usr/lib/x86_64-linux-gnu/libaio.*
[ "${KEEP_SSH:-0}" = 1 ] || rm -f /usr/bin/ssh /usr/bin/ssh-keygen /usr/bin/ip /usr/sbin/ip
exec "$@"' bash "$@" && status=0 || status=$?
rm -rf "$layers"
exit $status
