#!/usr/bin/env bash
# Measure one GPU with the moeplan profiler and its plain-loop reference; one device call, ~3-5 min.
#
#   bash bench/gpu_profile.sh            # writes to $OUT (device tool) or out/gpu_profile/
#
# Installs moeplan (no dependencies, no network: torch, numpy, pyyaml, rich, typer, pandas must be
# there), runs `python -m moeplan.profiler` (full plan, base profile chosen from the GPU name), then
# the plain loop for the headline figures, and prints the headline table (markdown). Files:
# <gpu>-profile.yaml (measured HardwareProfile), <gpu>-profile.json (every raw measurement),
# <gpu>-reference.json, <gpu>-table.md, <gpu>-profile.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_profile}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3

$PY - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "numpy", "yaml", "rich", "typer", "pandas") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages: {', '.join(missing)}")
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . ; then
    # moeplan is a namespace package: a shim folder that maps profiler/ and hardware_profiles/ into it works too
    echo "pip install failed; importing moeplan through a PYTHONPATH shim"
    shim=$(mktemp -d)
    mkdir -p "$shim/moeplan"
    for d in profiler hardware_profiles solvers dashboard; do ln -s "$PWD/$d" "$shim/moeplan/$d"; done
    export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import moeplan.profiler.command, moeplan.hardware; print('moeplan importable')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv || true

tag=$($PY -c "import torch; n = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'; print('h200' if 'H200' in n else 'h100' if 'H100' in n else 'gpu')")
start=$(date +%s)
$PY -m moeplan.profiler --out "$OUT/$tag-profile.yaml" --json "$OUT/$tag-profile.json" 2>&1 | tee "$OUT/$tag-profile.log"
echo "profiler: $(( $(date +%s) - start )) s"
$PY -m moeplan.profiler.reference "$OUT/$tag-profile.json" --out "$OUT/$tag-reference.json" 2>&1 | tee -a "$OUT/$tag-profile.log"
$PY bench/profile_table.py "$OUT/$tag-profile.json" --reference "$OUT/$tag-reference.json" | tee "$OUT/$tag-table.md"
echo "total: $(( $(date +%s) - start )) s"
