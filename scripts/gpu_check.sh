#!/usr/bin/env bash
# All GPU checks in one go, on a bare GPU machine (no network) or a Jetson:  bash scripts/gpu_check.sh OUT
#
# Without a GPU (no nvidia-smi, or it lists none) it prints one line saying so and exits 0. Otherwise, each
# step with its own time limit, all within GPU_CHECK_BUDGET_S (default 225 s: under 4 minutes on an H200):
#   install     the wheels of scripts/wheelhouse.txt not installed yet, from wheelhouse/ without an index
#               (scripts/make_wheelhouse.sh writes it on a machine with the index; carry it along)
#   build       pip install -e . without an index: the C library and, with nvcc, the CUDA library for this GPU
#   cuda-lib    whether the CUDA library was built (no nvcc: a recorded skip, and so are the CUDA parts)
#   info        mocha-edge info --json (engines available here, and why not)
#   pytest-gpu  pytest -m gpu on the test files with GPU tests (junit XML: OUT/pytest_gpu.xml)
#   memcheck, racecheck
#               the kernel tests (tests/test_runtime.py -m gpu) under compute-sanitizer; a missing or
#               unsupported compute-sanitizer is a recorded skip
#   gpu-stages  scripts/gpu_check.py: the PyTorch CUDA engine with the GPU stages vs the C stages on 1080p
#               frames (detections, vectors, stage times); FP16 and Q/DQ INT8 TensorRT engines where TensorRT
#               exists, recorded as skipped otherwise (OUT/gpu_stages.json)
# Writes OUT/gpu_check.json (each step: status pass|fail|skip, reason, seconds and its numbers) and
# OUT/gpu_check.log (everything printed). Exit code 1 if any step failed.
# PYTHON: the interpreter (default python3); GPU_CHECK_WHEELHOUSE: the wheel folder (default wheelhouse/).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 1
out="${1:-gpu_check}"

why=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
  why="nvidia-smi not found"
elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  why="nvidia-smi lists none"
fi
if [ -n "$why" ] && [ -z "${GPU_CHECK_FORCE:-}" ]; then
  echo "gpu_check: no GPU on this machine ($why): nothing to check"
  exit 0
fi

PY="${PYTHON:-python3}"
budget="${GPU_CHECK_BUDGET_S:-225}"
wheelhouse="${GPU_CHECK_WHEELHOUSE:-$root/wheelhouse}"
kernel_tests="tests/test_runtime.py"
mkdir -p "$out" && out="$(cd "$out" && pwd)" || exit 1
log="$out/gpu_check.log"
: >"$log"
rm -f "$out/gpu_check.json" "$out/gpu_stages.json" "$out/pytest_gpu.xml"  # nothing stale from an earlier run
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1 YOLO_AUTOINSTALL=false PYTHONUNBUFFERED=1 \
  PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
[ -d /usr/local/cuda/bin ] && export PATH="$PATH:/usr/local/cuda/bin"
t_start="${EPOCHREALTIME:-$SECONDS}"
deadline=$((SECONDS + budget))

say() { echo "$*" | tee -a "$log"; }
now() { echo "${EPOCHREALTIME:-$SECONDS}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# record NAME STATUS SECONDS REASON: one step of the summary
record() {
  local reason
  reason="$(printf '%s' "$4" | tr '\t\n\r' '   ' | cut -c1-600)"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$reason" >>"$tmp/steps.tsv"
  say "-- $1: $2${reason:+ ($reason)} [$3 s]"
}

# limit SECONDS: sets lim to SECONDS cut to what is left of the budget (cut=1 when it was), 0 when < 10 s left
limit() {
  local left=$((deadline - SECONDS - 5))
  lim="$1" cut=0
  [ "$lim" -gt "$left" ] && lim="$left" cut=1
  [ "$lim" -ge 10 ] || lim=0
}

# run NAME LIMIT CMD...: CMD under its own limit (cut to what is left of the budget), its output to the
# terminal, the log and $outf; sets rc (-1: not run, no time left), secs and lim
run() {
  local name="$1" t0
  limit "$2"
  shift 2
  outf="$tmp/$name.out"
  : >"$outf"
  if [ "$lim" = 0 ]; then
    rc=-1 secs=0
    return
  fi
  say "== $name (limit ${lim} s): $*"
  t0="$(now)"
  timeout -k 10 "$lim" "$@" 2>&1 | tee -a "$log" "$outf"
  rc="${PIPESTATUS[0]}"
  secs="$(since "$t0")"
}

last_line() { grep -v '^[[:space:]]*$' "$outf" | tail -n 1 | cut -c1-300; }
# the first line that says what went wrong (else the last line)
why_line() {
  local l
  l="$(grep -E 'fatal|[Ee]rror:|FAILED|[0-9]+ failed' "$outf" | grep -v 'subprocess-exited-with-error' | head -n 1 | sed 's/^[[:space:]]*//' | cut -c1-300)"
  printf '%s' "${l:-$(last_line)}"
}

# classify NAME [PASS_REASON [FAIL_REASON]]: pass on exit 0, else fail with the reason (time-out, or the exit
# code and the line that says why)
classify() {
  case "$rc" in
    -1) record "$1" skip 0 "no time left in the ${budget} s budget" ;;
    0) record "$1" pass "$secs" "${2:-}" ;;
    124 | 137)
      if [ "$cut" = 1 ]; then
        record "$1" skip "$secs" "stopped at the end of the ${budget} s budget (it had ${lim} s)"
      else
        record "$1" fail "$secs" "timed out after ${lim} s"
      fi
      ;;
    *) record "$1" fail "$secs" "exit code $rc: ${3:-$(why_line)}" ;;
  esac
}

gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>/dev/null | head -n 1)"
nvcc_bin="$(command -v nvcc || true)"
sanitizer="$(command -v compute-sanitizer || true)"
say "gpu_check: GPU ${gpu:-unknown}; python $("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1); nvcc ${nvcc_bin:-absent}; compute-sanitizer ${sanitizer:-absent}; budget ${budget} s"

# ---- install: the pinned wheels not installed yet, from the wheelhouse, no index, no dependencies
mapfile -t pins < <(grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' scripts/wheelhouse.txt | sed 's/[[:space:]#].*//')
mapfile -t missing < <("$PY" - "${pins[@]}" <<'PY'
import importlib.metadata as md, sys
for pin in sys.argv[1:]:
    try:
        md.version(pin.split("==")[0])
    except md.PackageNotFoundError:
        print(pin)
PY
)
if [ "${#missing[@]}" -eq 0 ]; then
  record install pass 0 "all of scripts/wheelhouse.txt already installed"
elif ! ls "$wheelhouse"/*.whl >/dev/null 2>&1; then
  record install fail 0 "missing ${missing[*]} and no wheels in $wheelhouse: run bash scripts/make_wheelhouse.sh where the package index is reachable and carry wheelhouse/"
else
  run install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$wheelhouse" "${missing[@]}"
  classify install "installed ${missing[*]}"
fi

# ---- build: the C library and (nvcc + this GPU) the CUDA library
run build 180 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
classify build
built=$([ "$rc" = 0 ] && echo 1 || echo 0)
cuda_built=0
if [ "$built" = 1 ]; then
  cuda="$("$PY" -c 'import json; from mocha_edge import runtime as rt; print(json.dumps(rt.build_info().get("cuda", {})))' 2>&1 | tail -n 1)"
  printf '%s\n' "$cuda" >"$tmp/cuda.json"
  if printf '%s' "$cuda" | grep -q '"built": true'; then
    cuda_built=1
    record cuda-lib pass 0 "$(printf '%s' "$cuda" | "$PY" -c 'import json,sys; c=json.load(sys.stdin); print(", ".join(c["archs"]), "-", c.get("why", ""))')"
  else
    record cuda-lib skip 0 "CUDA library not built: $(printf '%s' "$cuda" | "$PY" -c 'import json,sys; print(json.load(sys.stdin).get("why", "?"))' 2>/dev/null || echo "$cuda"); its kernel tests are skipped"
  fi
else
  record cuda-lib skip 0 "the build failed"
fi

# ---- the rest needs the installed package
if [ "$built" = 1 ]; then
  # shellcheck disable=SC2016  # expanded by the inner bash
  run info 60 bash -c '"$1" -m mocha_edge info --json >"$2" 2>"$3"; rc=$?; cat "$3"; exit $rc' _ "$PY" "$tmp/info.json" "$tmp/info.err"
  classify info

  gpu_files=()
  # shellcheck disable=SC2013  # file names without spaces
  for f in $(grep -l 'mark\.gpu' tests/test_*.py); do
    # without the CUDA library its kernel tests cannot run: recorded by cuda-lib, left out here
    [ "$cuda_built" = 0 ] && [ "$f" = "$kernel_tests" ] || gpu_files+=("$f")
  done
  timeout_opt=()
  "$PY" -c 'import pytest_timeout' 2>/dev/null && timeout_opt=(--timeout=120)
  if [ "${#gpu_files[@]}" -eq 0 ]; then
    record pytest-gpu skip 0 "no test file with GPU tests to run"
  else
    run pytest-gpu 150 "$PY" -m pytest -m gpu -p no:cacheprovider -q -rfEs "${timeout_opt[@]}" \
      --junitxml="$out/pytest_gpu.xml" "${gpu_files[@]}"
    if [ "$rc" = 5 ]; then record pytest-gpu skip "$secs" "no GPU tests collected"; else classify pytest-gpu "$(last_line)" "$(last_line)"; fi
  fi

  run gpu-stages 150 "$PY" scripts/gpu_check.py "$out"
  if [ "$rc" = 0 ] && [ -f "$out/gpu_stages.json" ]; then
    st="$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["status"] + "\t" + r.get("reason", ""))' "$out/gpu_stages.json")"
    record gpu-stages "${st%%$'\t'*}" "$secs" "${st#*$'\t'}"
  else
    classify gpu-stages
  fi

  # the kernel tests under compute-sanitizer, memcheck and racecheck at once (nothing is timed meanwhile)
  tools=()
  for tool in memcheck racecheck; do
    if [ "$cuda_built" = 0 ]; then
      record "$tool" skip 0 "the CUDA library is not built"
    elif [ -z "$sanitizer" ]; then
      record "$tool" skip 0 "compute-sanitizer not found"
    else
      tools+=("$tool")
    fi
  done
  limit 90
  if [ "${#tools[@]}" -gt 0 ] && [ "$lim" = 0 ]; then
    for tool in "${tools[@]}"; do record "$tool" skip 0 "no time left in the ${budget} s budget"; done
  elif [ "${#tools[@]}" -gt 0 ]; then
    say "== ${tools[*]} (limit ${lim} s each, at once): $sanitizer --tool TOOL $PY -m pytest -m gpu $kernel_tests"
    pids=()
    for tool in "${tools[@]}"; do
      (
        t0="$(now)"
        timeout -k 10 "$lim" "$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 20 \
          "$PY" -m pytest -m gpu -p no:cacheprovider -q -x "$kernel_tests" >"$tmp/$tool.out" 2>&1
        r=$?
        since "$t0" >"$tmp/$tool.secs"
        exit "$r"
      ) &
      pids+=("$!")
    done
    for i in "${!tools[@]}"; do
      wait "${pids[$i]}"
      rc=$? tool="${tools[$i]}" outf="$tmp/${tools[$i]}.out"
      secs="$(cat "$tmp/$tool.secs" 2>/dev/null || echo 0)"
      { echo "== $tool output"; cat "$outf"; } | tee -a "$log"
      summary="$(grep -E '(ERROR|RACECHECK) SUMMARY' "$outf" | tail -n 1 | sed 's/^=* *//')"
      unsupported="$(grep -iE 'device not supported|not supported on this|unable to (find|load) .*(injection|library)' "$outf" | head -n 1 | sed 's/^=* *//')"
      if [ -n "$unsupported" ] && [ "$rc" != 0 ]; then
        record "$tool" skip "$secs" "compute-sanitizer cannot run here: $unsupported"
      elif [ "$rc" = 86 ]; then
        record "$tool" fail "$secs" "${summary:-errors found}"
      else
        classify "$tool" "$summary"
      fi
    done
  fi
else
  for s in info pytest-gpu gpu-stages memcheck racecheck; do record "$s" skip 0 "the build failed"; done
fi

# ---- the summary
"$PY" - "$tmp" "$out" "$(since "$t_start")" "$budget" "$gpu" "${nvcc_bin:-}" "${sanitizer:-}" <<'PY' | tee -a "$log"
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path

tmp, out, seconds, budget, gpu, nvcc, sanitizer = sys.argv[1:8]
tmp, out = Path(tmp), Path(out)

def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None

steps = []
for line in (tmp / "steps.tsv").read_text().splitlines():
    name, status, secs, reason = (line.split("\t") + [""] * 4)[:4]
    step = {"name": name, "status": status, "reason": reason, "seconds": float(secs or 0)}
    if name == "cuda-lib":
        step["build"] = load(tmp / "cuda.json")
    elif name == "info" and status == "pass":
        step["info"] = load(tmp / "info.json")
    elif name == "pytest-gpu" and (out / "pytest_gpu.xml").is_file():
        try:
            root = ET.parse(out / "pytest_gpu.xml").getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
            n["not_passed"] = [f"{c.get('classname')}::{c.get('name')}: {x.tag}" for c in suite.iter("testcase")
                               for x in c if x.tag in ("failure", "error", "skipped")]
            step["tests"] = n
        except (ET.ParseError, AttributeError, ValueError) as e:
            step["tests"] = f"junit XML unreadable: {e}"
    elif name == "gpu-stages":
        step["results"] = load(out / "gpu_stages.json")
    elif name in ("memcheck", "racecheck"):
        m = re.search(r"(\d+) errors?", reason)
        if m:
            step["errors"] = int(m[1])
    steps.append(step)
failed = [s["name"] for s in steps if s["status"] == "fail"]
summary = {"status": "fail" if failed else "pass", "failed": failed, "gpu": gpu, "nvcc": nvcc or None,
           "compute_sanitizer": sanitizer or None, "budget_s": int(budget), "seconds": float(seconds),
           "steps": steps}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"gpu_check: {'FAIL' if failed else 'PASS'} in {float(seconds):.0f} s: "
      + ", ".join(f"{s['name']} {s['status']}" for s in steps) + f" -> {out / 'gpu_check.json'}")
sys.exit(1 if failed else 0)
PY
exit "${PIPESTATUS[0]}"
