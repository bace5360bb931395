#!/usr/bin/env bash
# Verify the newest committed checkpoint of a training run: integrity, completeness and, with a
# model factory, reassembly and golden replay. Meant for CI and cron.
#
#   usage: launch/ci/verify-latest.sh ROOT [MODEL] [-- more 'shardckpt verify' flags]
#     ROOT   checkpoint root: a path or fsspec URL (s3://bucket/run1, ...)
#     MODEL  model factory MOD:FN (a module on PYTHONPATH or path/to/file.py); empty or
#            omitted: integrity and completeness only
#
#   environment:
#     SHARDCKPT       command to run (default: .venv/bin/shardckpt if present, else shardckpt)
#     VERIFY_NPROC    ranks to verify with (default 1; e.g. 2 to replay under FSDP2)
#     VERIFY_REPORT   where to write the JSON verdict (default: verify-report.json)
#     OMP_NUM_THREADS threads per rank (default 1 when VERIFY_NPROC > 1)
#
# Prints one summary line on stderr (a corrupt manifest, an empty root: one line, no traceback),
# then a verdict's checks. The exit code is shardckpt verify's: 0 ok, 1 replay mismatch, 2 corrupt
# / missing / incomplete (an empty root too), 64 usage error, 70 internal error.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 64
fi
ROOT=$1
shift
MODEL=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
  MODEL=$1
  shift
fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then
  shift
fi

if [ -n "${SHARDCKPT:-}" ]; then
  read -r -a CMD <<< "$SHARDCKPT"
elif [ -x .venv/bin/shardckpt ]; then
  CMD=(.venv/bin/shardckpt)
else
  CMD=(shardckpt)
fi
NPROC=${VERIFY_NPROC:-1}
REPORT=${VERIFY_REPORT:-verify-report.json}
if [ "$NPROC" -gt 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

ARGS=(verify "$ROOT" --nproc "$NPROC" --json)
if [ -n "$MODEL" ]; then
  ARGS+=(--model "$MODEL")
fi

ERRLOG=$(mktemp)
trap 'rm -f "$ERRLOG"' EXIT
set +e
"${CMD[@]}" "${ARGS[@]}" "$@" > "$REPORT" 2> "$ERRLOG"
rc=$?
set -e

# One summary line on stderr, whatever happened (a verdict, an error document such as a corrupt
# manifest or an empty root, or no JSON at all); the check details follow a verdict. Never a
# traceback: a report that cannot be read is described, not parsed blindly.
python3 - "$REPORT" "$ROOT" "$rc" "$ERRLOG" <<'PY' >&2 || echo "verify-latest: $ROOT: exit $rc (report: $REPORT)" >&2
import json, sys
report, root, rc, errlog = sys.argv[1:]
try:
    with open(report, encoding="utf-8") as f:
        doc = json.load(f)
except (OSError, ValueError):
    doc = None
try:
    with open(errlog, encoding="utf-8", errors="replace") as f:
        err = [ln.rstrip() for ln in f if ln.strip()]
except OSError:
    err = []
tail = f"exit {rc}; report: {report}"
if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
    e = doc["error"]
    msg = " ".join(str(e.get("message", "")).split())
    print(f"verify-latest: {root}: {e.get('type', 'error')}: {msg} ({tail})")
elif isinstance(doc, dict) and "step" in doc and isinstance(doc.get("checks"), list):
    for line in err:  # warnings of the run (an unreachable replica, ...)
        print(f"  {line}")
    print(f"verify-latest: {root}: step {doc['step']}: {'OK' if doc.get('ok') else 'FAILED'} "
          f"(saved at world size {doc.get('saved_world_size', '?')}, verified on "
          f"{doc.get('nproc', '?')}; {tail})")
    for c in doc["checks"]:
        if isinstance(c, dict):
            state = "skipped" if c.get("skipped") else "ok" if c.get("ok") else "FAILED"
            print(f"  {c.get('name', '?'):<13} {state:<8} {c.get('detail', '')}")
else:
    last = err[-1] if err else "no output"
    print(f"verify-latest: {root}: no verdict: {' '.join(last.split())[:500]} ({tail})")
PY
exit "$rc"
