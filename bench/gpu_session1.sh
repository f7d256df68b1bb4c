#!/usr/bin/env bash
# One device call on one H100 (or H200): profile the GPU, then — using that fresh profile for every
# prediction — the runtime's per-device replay / stack / host-move bench and the whole-forward-step
# check of the cost model. Each step has its own time limit so a slow one cannot starve the next.
#   device: run(command="bash bench/gpu_session1.sh", kind="nvidia-h100-x1", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session1}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 330 bash bench/gpu_profile.sh || echo "profile step ended with $?"
tag=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100')")
profile="$OUT/$tag-profile.yaml"
[ -f "$profile" ] || profile="hardware_profiles/$tag-sxm.yaml"
echo "== runtime bench with $profile"
timeout 170 python3 bench/gpu_runtime.py "$OUT/runtime" --profile "$profile" 2>&1 | tail -60 || echo "runtime step ended with $?"
echo "== forward-step check with $profile"
timeout 80 python3 bench/gpu_forward.py "$profile" "$OUT/forward" 2>&1 | tail -20 || echo "forward step ended with $?"
ls -R "$OUT"
