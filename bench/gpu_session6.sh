#!/usr/bin/env bash
# One device call for issue 26's folding shards, on whichever GPU it runs: a two-pass profile of
# the folding models' shapes (Mixtral-8x22B and Qwen2-57B-A14B: GEMM grid, expert curves,
# attention prefill / train / decode curves; merged onto the committed measured profile of this
# GPU kind), then the folding shard check (bench/gpu_folding.py: forward + backward of each
# attention and expert shard, loop and grouped_mm kernels, predicted from that profile).
#   device: run(command="bash bench/gpu_session6.sh", kind="nvidia-h200", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_session6}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
tag=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100')")
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
profile="$OUT/$tag-profile.yaml"
echo "== profile (two passes) $(( $(date +%s) - t0 )) s"
timeout 330 python3 -m moeplan.profiler --only device,gemm,experts,attention --models mixtral-8x22b,qwen2-57b-a14b \
    --merge "hardware_profiles/measured/$tag-sxm.yaml" --out "$profile" --json "$OUT/$tag-profile.json" \
    > "$OUT/profile.log" 2>&1 || echo "profile ended with $?"
tail -2 "$OUT/profile.log"
[ -f "$profile" ] || profile="hardware_profiles/measured/$tag-sxm.yaml"
echo "== folding shards $(( $(date +%s) - t0 )) s"
left=$(( 570 - ( $(date +%s) - t0 ) ))
timeout "$left" python3 bench/gpu_folding.py --profile "$profile" --out "$OUT" > "$OUT/folding.log" 2>&1 \
    || echo "folding ended with $?"
tail -22 "$OUT/folding.log"
cat "$OUT/profile.log" "$OUT/folding.log" > "$OUT/session.log"
rm -f "$OUT/profile.log" "$OUT/folding.log"
