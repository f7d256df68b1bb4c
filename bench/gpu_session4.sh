#!/usr/bin/env bash
# One device call for issue 26, on whichever GPU it runs: two independent profiling passes of the
# models the checks use (merged onto the committed measured profile of this GPU kind), then the
# whole-forward-step check (calibration and judged steps) and the per-device replay check, both
# predicted from pass 1. `moeplan calibrate` and bench/calibration.py then run on the CPU.
#   device: run(command="bash bench/gpu_session4.sh", kind="nvidia-h200", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session4}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT/forward" "$OUT/runtime"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
tag=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100')")
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
models=olmoe-1b-7b,qwen1.5-moe-a2.7b,deepseek-v2-lite,mixtral-8x7b
for pass in 1 2; do
  echo "== profile pass $pass"
  timeout 170 python3 -m moeplan.profiler --only device,experts,routing,attention --models "$models" \
      --merge "hardware_profiles/measured/$tag-sxm.yaml" --out "$OUT/$tag-profile-pass$pass.yaml" \
      --json "$OUT/$tag-profile-pass$pass.json" > "$OUT/profile.log" 2>&1 || echo "profile pass $pass ended with $?"
  tail -2 "$OUT/profile.log"
done
profile="$OUT/$tag-profile-pass1.yaml"
[ -f "$profile" ] || profile="hardware_profiles/measured/$tag-sxm.yaml"
echo "== forward step with $profile"
timeout 170 python3 bench/gpu_forward.py "$profile" "$OUT/forward" > "$OUT/forward.log" 2>&1 || echo "forward ended with $?"
tail -3 "$OUT/forward.log"
echo "== per-device replay with $profile"
timeout 240 python3 bench/gpu_runtime.py "$OUT/runtime" --profile "$profile" > "$OUT/runtime.log" 2>&1 || echo "replay ended with $?"
tail -3 "$OUT/runtime.log"
cat "$OUT/forward.log" "$OUT/runtime.log" > "$OUT/session.log"
rm -f "$OUT/profile.log" "$OUT/forward.log" "$OUT/runtime.log"
ls -la "$OUT" "$OUT/forward" "$OUT/runtime"
