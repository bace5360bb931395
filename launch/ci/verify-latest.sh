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
# The exit code is shardckpt verify's: 0 ok, 1 replay mismatch, 2 corrupt / missing /
# incomplete, 64 usage error, 70 internal error.
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
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

echo "== ${CMD[*]} ${ARGS[*]} $*" >&2
set +e
"${CMD[@]}" "${ARGS[@]}" "$@" > "$REPORT"
rc=$?
set -e

if [ -s "$REPORT" ]; then
  # A short summary for the CI log; the full verdict stays in $REPORT.
  python3 - "$REPORT" <<'PY' >&2 || true
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"step {doc['step']}: {'OK' if doc['ok'] else 'FAILED'} "
      f"(saved at world size {doc['saved_world_size']}, verified on {doc['nproc']})")
for c in doc["checks"]:
    state = "skipped" if c.get("skipped") else "ok" if c["ok"] else "FAILED"
    print(f"  {c['name']:<13} {state:<8} {c['detail']}")
PY
fi
echo "== exit $rc (report: $REPORT)" >&2
exit "$rc"
