#!/usr/bin/env bash
# The byte tokens the GPU scripts read, prepared here (the GPU machine has no `datasets`) and carried as
# data/ (about 12 MB). Both folders are named by the absolute path of their source, so the scripts make
# the same (empty) source folders there and find the tokens by the same names.
#   /tmp/shakes_src: tinyshakespeare in 100 parts (bench/gpu_profile.sh; the tokens only feed the model)
#   /tmp/stdlib_src: this Python's top-level standard-library .py files as .txt, the project's `stdlib`
#                    corpus (bench/gpu_transfer.sh: the device's Python is another version, so its own
#                    stdlib would be another corpus)
# Run from the project root:  bash bench/gpu_data.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# the scripts import the project as installed (pip install -e .) or on PYTHONPATH; -P leaves the folder out
python3 -P -c "import mupgpt" 2>/dev/null || { echo "error: mupgpt is not importable: run pip install -e . (or export PYTHONPATH=\$PWD) in the project root" >&2; exit 2; }
SHAKES=${SHAKES:-../shared/data/tinyshakespeare.txt}
rm -rf /tmp/shakes_src /tmp/stdlib_src
mkdir -p /tmp/shakes_src /tmp/stdlib_src
python3 - "$SHAKES" <<'PY'
import glob, os, sys, sysconfig
text = open(sys.argv[1], encoding="utf-8").read()
n = 100
for i in range(n):
    with open(f"/tmp/shakes_src/part{i:03d}.txt", "w", encoding="utf-8") as f:
        f.write(text[i * len(text) // n:(i + 1) * len(text) // n])
files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
for p in files:
    with open(os.path.join("/tmp/stdlib_src", os.path.basename(p)[:-3] + ".txt"), "w", encoding="utf-8") as f:
        f.write(open(p, encoding="utf-8", errors="replace").read())
print(f"{len(text):,} characters of tinyshakespeare in {n} parts; {len(files)} stdlib files "
      f"({sum(os.path.getsize(p) for p in files):,} bytes) from {sysconfig.get_paths()['stdlib']}")
PY
python3 scripts/prepare_data.py --dataset /tmp/shakes_src --tokenizer bytes --data_dir data | grep -E '"path"|tokens'
python3 scripts/prepare_data.py --dataset /tmp/stdlib_src --tokenizer bytes --data_dir data | grep -E '"path"|tokens'
du -sh data
