#!/usr/bin/env bash
# One device call: profile this GPU (every section one GPU can measure), then check the cost
# model's whole-forward-step prediction against a measured forward pass, using that profile.
#   device: run(command="bash bench/gpu_profile_forward.sh", kind="nvidia-h200", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_profile_forward}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
timeout 300 bash bench/gpu_profile.sh > "$OUT/profile-run.log" 2>&1 || echo "profile step ended with $?"
tail -50 "$OUT/profile-run.log"
tag=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100')")
echo "== forward-step check with $OUT/$tag-profile.yaml"
timeout 200 python3 bench/gpu_forward.py "$OUT/$tag-profile.yaml" "$OUT/forward" 2>&1 | tail -16 || echo "forward step ended with $?"
rm -f "$OUT/profile-run.log"
