#!/usr/bin/env bash
# Third device call on one H100: measure what the first run's profile lacked (routing/permutation
# overhead, the OLMoE and Qwen1.5-MoE expert and attention shapes) and merge it into the committed
# measured profile; check the whole-forward-step prediction with it; run the offloading bench.
#   device: run(command="bash bench/gpu_session3.sh", kind="nvidia-h100-x1", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session3}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
echo "== profile merge"
timeout 150 python3 -m moeplan.profiler --only routing,experts,attention \
    --models olmoe-1b-7b,qwen1.5-moe-a2.7b,deepseek-v2-lite,mixtral-8x7b,deepseek-v3,qwen3-30b-a3b \
    --merge hardware_profiles/measured/h100-sxm.yaml --out "$OUT/h100-profile.yaml" \
    --json "$OUT/h100-profile-merge.json" > "$OUT/merge.log" 2>&1 || echo "merge step ended with $?"
tail -4 "$OUT/merge.log"
profile="$OUT/h100-profile.yaml"
[ -f "$profile" ] || profile=hardware_profiles/measured/h100-sxm.yaml
echo "== forward-step check with $profile"
timeout 150 python3 bench/gpu_forward.py "$profile" "$OUT/forward" 2>&1 | tail -14 || echo "forward step ended with $?"
echo "== offload bench"
timeout 250 python3 bench/gpu_offload.py "$OUT/offload" --profile "$profile" --budget-s 170 2>&1 | tail -40 || echo "offload step ended with $?"
ls -R "$OUT"
