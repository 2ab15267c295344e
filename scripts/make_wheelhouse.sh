#!/usr/bin/env bash
# The wheels the lent GPU machine lacks for scripts/gpu_check.sh:  bash scripts/make_wheelhouse.sh [DIR]
#
# Run on the CPU machine (it needs the package index). Downloads the pinned wheels of scripts/wheelhouse.txt
# for CPython 3.12 on manylinux x86_64 (what the GPU machine runs) into DIR (default: wheelhouse/ in the
# repository, git-ignored), without their dependencies: everything else comes with the GPU machine's image
# (the `device:` lines of wheelhouse.txt). Checks that each wheel's own requirements are covered by that
# list, and that the wheelhouse stays under 60 MiB (it travels with the working tree: the device tool carries
# 64 MiB in all). Re-runnable: wheels already there are kept, stale versions of listed packages removed.
# mocha-edge itself is not packed: the working tree travels and gpu_check.sh installs it from there.
# Prints one summary line; pip's output only when pip fails.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
list="$root/scripts/wheelhouse.txt"
dir="${1:-$root/wheelhouse}"
limit_mib=60
py="${PYTHON:-python3}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

# pins whose wheel is not in DIR yet (stale versions of listed packages are removed first)
mapfile -t missing < <("$py" - "$list" "$dir" <<'PY'
import re, sys
from pathlib import Path

def norm(n):
    return re.sub(r"[-_.]+", "_", n).lower()

pins = {}
for line in Path(sys.argv[1]).read_text().splitlines():
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#]+)", line)
    if m:
        pins[norm(m[1])] = (m[1], m[2])
have = {}
for whl in Path(sys.argv[2]).glob("*.whl"):
    name, ver = whl.name.split("-")[:2]
    if norm(name) in pins and ver != pins[norm(name)][1]:
        whl.unlink()  # a stale pin: two versions of one package stop the whole install
    else:
        have[norm(name)] = ver
for key, (name, ver) in pins.items():
    if have.get(key) != ver:
        print(f"{name}=={ver}")
PY
)

downloaded=0
if [ "${#missing[@]}" -gt 0 ]; then
  logf="$(mktemp)"
  if ! "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux1_x86_64 --platform any \
      -d "$dir" "${missing[@]}" >"$logf" 2>&1; then
    cat "$logf" >&2
    echo "make_wheelhouse: pip could not download ${missing[*]} (cp312 manylinux x86_64 wheels) into $dir" >&2
    rm -f "$logf"
    exit 1
  fi
  rm -f "$logf"
  downloaded=${#missing[@]}
fi

# every wheel's requirements (for Python 3.12 on Linux x86-64, no extras) must be on the list; total size
"$py" - "$list" "$dir" "$limit_mib" "$downloaded" "$root" <<'PY'
import re, subprocess, sys, zipfile
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

def norm(n):
    return re.sub(r"[-_.]+", "_", n).lower()

listf, d, limit_mib, downloaded = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
root = Path(sys.argv[5])
covered = set()
pins = set()
for line in listf.read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    m = re.match(r"^(device|skip):\s*(.*)$", line)
    if m:
        for word in m[2].split():
            covered.update(norm(x) for x in word.split("="))
    elif "==" in line:
        pins.add(norm(line.split("==")[0]))
covered |= pins
env = default_environment()
env.update(python_version="3.12", python_full_version="3.12.3", sys_platform="linux", platform_system="Linux",
           platform_machine="x86_64", implementation_name="cpython", platform_python_implementation="CPython")
wheels = sorted(d.glob("*.whl"))
uncovered = []
for whl in wheels:
    if norm(whl.name.split("-")[0]) not in pins:
        continue
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        if norm(req.name) not in covered:
            uncovered.append(f"{whl.name.split('-')[0]} needs {req}")
if uncovered:
    sys.exit("make_wheelhouse: requirements neither pinned nor on the GPU machine (add them to "
             f"scripts/wheelhouse.txt): {'; '.join(uncovered)}")
got = {norm(w.name.split("-")[0]) for w in wheels}
if pins - got:
    sys.exit(f"make_wheelhouse: no wheel for {', '.join(sorted(pins - got))} in {d}")
total = sum(w.stat().st_size for w in wheels)
mib = total / 2**20
if mib > limit_mib:
    sys.exit(f"make_wheelhouse: {d} holds {mib:.1f} MiB of wheels, over the {limit_mib} MiB limit (the device "
             "tool carries 64 MiB with the working tree): drop a wheel from scripts/wheelhouse.txt")
# what the device tool sends besides: tracked and untracked-not-ignored files (64 MiB with the carried paths)
tree = ""
try:
    files = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                           capture_output=True, text=True).stdout.split("\0")
    paths = [root / f for f in files if f]
    tree_mib = sum(p.stat().st_size for p in paths if p.is_file() and d not in p.parents) / 2**20
    if tree_mib + mib > 64:
        sys.exit(f"make_wheelhouse: the working tree ({tree_mib:.1f} MiB) and the wheels ({mib:.1f} MiB) are over "
                 "the 64 MiB the device tool carries")
    tree = f"; with the working tree {tree_mib + mib:.1f} of 64 MiB"
except (OSError, subprocess.CalledProcessError):
    pass
extra = len(wheels) - len(pins)
print(f"make_wheelhouse: {len(pins)} wheels, {mib:.1f} MiB in {d} ({downloaded} downloaded, "
      f"{len(pins) - downloaded} already there{f', {extra} other wheels' if extra > 0 else ''}); "
      f"limit {limit_mib} MiB{tree}")
PY
