#!/usr/bin/env bash
# One device call for issue 26 (second round), on whichever GPU it runs: a two-pass profile with
# the dense GEMM grid (merged onto the committed measured profile of this GPU kind), the GEMM
# shard check at the exact shapes of DeepSeek-V3 / Qwen3-30B-A3B / Mixtral-8x7B (bench/gpu_shapes.py),
# the folding shard check (bench/gpu_folding.py), the whole-forward-step check (sync-free grouped MoE
# layers) and the per-device replay check, all predicted from this machine's new profile.
# bench/calibration.py then runs on the CPU.
#   device: run(command="bash bench/gpu_session5.sh", kind="nvidia-h200", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session5}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT/forward" "$OUT/runtime"
t0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
tag=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100')")
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
models=olmoe-1b-7b,qwen1.5-moe-a2.7b,deepseek-v2-lite,mixtral-8x7b
profile="$OUT/$tag-profile.yaml"
echo "== profile (two passes) $(( $(date +%s) - t0 )) s"
timeout 220 python3 -m moeplan.profiler --only device,gemm,experts,routing,attention --models "$models" \
    --merge "hardware_profiles/measured/$tag-sxm.yaml" --out "$profile" --json "$OUT/$tag-profile.json" \
    > "$OUT/profile.log" 2>&1 || echo "profile ended with $?"
tail -2 "$OUT/profile.log"
[ -f "$profile" ] || profile="hardware_profiles/measured/$tag-sxm.yaml"
echo "== GEMM shards $(( $(date +%s) - t0 )) s"
timeout 100 python3 bench/gpu_shapes.py --profile "$profile" --out "$OUT" > "$OUT/shapes.log" 2>&1 || echo "shapes ended with $?"
tail -6 "$OUT/shapes.log"
echo "== folding shards $(( $(date +%s) - t0 )) s"
timeout 60 python3 bench/gpu_folding.py --profile "$profile" --out "$OUT" > "$OUT/folding.log" 2>&1 || echo "folding ended with $?"
tail -14 "$OUT/folding.log"
echo "== forward step $(( $(date +%s) - t0 )) s"
timeout 150 python3 bench/gpu_forward.py "$profile" "$OUT/forward" > "$OUT/forward.log" 2>&1 || echo "forward ended with $?"
tail -1 "$OUT/forward.log"
echo "== per-device replay $(( $(date +%s) - t0 )) s"
left=$(( 560 - ( $(date +%s) - t0 ) ))
timeout "$left" python3 bench/gpu_runtime.py "$OUT/runtime" --profile "$profile" > "$OUT/runtime.log" 2>&1 || echo "replay ended with $?"
tail -2 "$OUT/runtime.log"
cat "$OUT/profile.log" "$OUT/shapes.log" "$OUT/folding.log" "$OUT/forward.log" "$OUT/runtime.log" > "$OUT/session.log"
rm -f "$OUT/profile.log" "$OUT/shapes.log" "$OUT/folding.log" "$OUT/forward.log" "$OUT/runtime.log"
echo "== done $(( $(date +%s) - t0 )) s"
ls -la "$OUT" "$OUT/forward" "$OUT/runtime"
