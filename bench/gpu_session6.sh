#!/usr/bin/env bash
# One device call for issue 26 (third round), on whichever GPU it runs. As gpu_session5.sh, with
# every profiler point and the per-device replay timed as device work (queued behind a busy wait
# twice the host's enqueue time: what a CUDA-graph replay costs): a two-pass profile with the dense
# GEMM grid (merged onto the committed measured profile of this GPU kind), the GEMM shard check
# (bench/gpu_shapes.py), the folding shard check (bench/gpu_folding.py), the whole-forward-step
# check and the per-device replay check, all predicted from this machine's new profile. The profile
# also covers the folding shards' models (Mixtral-8x22B, Qwen2-57B-A14B: expert curves and the
# attention forward + backward curve that prices the attention backward).
# SECTIONS (first argument, default all) picks a subset: profile,shapes,folding,forward,replay;
# PROFILE names the profile to predict from when this call does not profile; ONLY the profiler
# sections (default device,gemm,experts,routing,attention) and BASE the profile they are merged onto
# (default the committed measured profile of this GPU kind); TOTAL the seconds the whole call may take
# (default 575: the forward step, last, gets what is left); MODELS the profiled models.
# bench/calibration.py then runs on the CPU.
#   device: run(command="bash bench/gpu_session6.sh", kind="nvidia-h100-x1", timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
SECTIONS="${1:-profile,shapes,folding,forward,replay}"
OUT="${OUT:-out/gpu_session6}"
export OUT PYTHONUNBUFFERED=1
mkdir -p "$OUT/forward" "$OUT/runtime"
t0=$(date +%s)
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install failed"
tag=$(python3 -c "import torch; n = torch.cuda.get_device_name(0); print('h200' if 'H200' in n else 'h100')")
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
models=${MODELS:-olmoe-1b-7b,qwen1.5-moe-a2.7b,deepseek-v2-lite,mixtral-8x7b,mixtral-8x22b,qwen2-57b-a14b}
profile="$OUT/$tag-profile.yaml"
if want profile; then
    echo "== profile (two passes) $(( $(date +%s) - t0 )) s"
    timeout 270 python3 -m moeplan.profiler --only "${ONLY:-device,gemm,experts,routing,attention}" --models "$models" \
        --merge "${BASE:-hardware_profiles/measured/$tag-sxm.yaml}" --out "$profile" --json "$OUT/$tag-profile.json" \
        > "$OUT/profile.log" 2>&1 || echo "profile ended with $?"
    tail -2 "$OUT/profile.log"
fi
[ -f "$profile" ] || profile="${PROFILE:-hardware_profiles/measured/$tag-sxm.yaml}"
echo "predicting from $profile"
if want shapes; then
    echo "== GEMM shards $(( $(date +%s) - t0 )) s"
    timeout 100 python3 bench/gpu_shapes.py --profile "$profile" --out "$OUT" > "$OUT/shapes.log" 2>&1 || echo "shapes ended with $?"
    tail -6 "$OUT/shapes.log"
fi
if want folding; then
    echo "== folding shards $(( $(date +%s) - t0 )) s"
    timeout 120 python3 bench/gpu_folding.py --profile "$profile" --out "$OUT" > "$OUT/folding.log" 2>&1 || echo "folding ended with $?"
    tail -24 "$OUT/folding.log"
fi
if want replay; then
    echo "== per-device replay $(( $(date +%s) - t0 )) s"
    timeout 210 python3 bench/gpu_runtime.py "$OUT/runtime" --profile "$profile" > "$OUT/runtime.log" 2>&1 || echo "replay ended with $?"
    tail -2 "$OUT/runtime.log"
fi
if want forward; then
    echo "== forward step $(( $(date +%s) - t0 )) s"
    left=$(( ${TOTAL:-575} - ( $(date +%s) - t0 ) ))
    if (( left > 30 )); then
        timeout "$left" python3 bench/gpu_forward.py "$profile" "$OUT/forward" > "$OUT/forward.log" 2>&1 || echo "forward ended with $?"
        tail -1 "$OUT/forward.log"
    else
        echo "forward step skipped: ${left} s left of TOTAL"
    fi
fi
cat "$OUT"/*.log > "$OUT/session.log" 2>/dev/null
rm -f "$OUT"/profile.log "$OUT"/shapes.log "$OUT"/folding.log "$OUT"/forward.log "$OUT"/runtime.log
echo "== done $(( $(date +%s) - t0 )) s"
ls -la "$OUT" "$OUT/forward" "$OUT/runtime"
