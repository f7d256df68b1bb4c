#!/usr/bin/env bash
# Second device call on one H100, with the measured profile committed by the first
# (hardware_profiles/measured/h100-sxm.yaml): whole-forward-step check, folding shard timings,
# and the runtime's per-device replay / stack / host-move bench.
#   device: run(command="bash bench/gpu_session2.sh", kind="nvidia-h100-x1", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session2}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
profile=hardware_profiles/measured/h100-sxm.yaml
echo "== forward-step check"
timeout 100 python3 bench/gpu_forward.py "$profile" "$OUT/forward" 2>&1 | tail -16 || echo "forward step ended with $?"
echo "== folding shards"
timeout 110 python3 bench/gpu_folding.py --profile "$profile" --out "$OUT/folding" 2>&1 | tail -20 || echo "folding step ended with $?"
echo "== runtime bench"
timeout 330 python3 bench/gpu_runtime.py "$OUT/runtime" --profile "$profile" > "$OUT/runtime.log" 2>&1 || echo "runtime step ended with $?"
tail -45 "$OUT/runtime.log"
ls -R "$OUT"
