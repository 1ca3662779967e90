#!/bin/bash
# The fidelity benchmark's recipe on one GPU, several variants trained at once, each for $MIN wall
# minutes, then scored twice (DDIM eta 0 with 25 steps, as the benchmark; eta 1 with 50 steps).
# docs/research/fidelity.md (GPU runs). Logs: $OUT/log.txt; per run $OUT/<run>.{train,eta1}.log,
# the reports $OUT/<run>.md and <run>.eta1.md, and $OUT/<run>.tgz (fidelity.json, grids, loss plot, CSV).
#
# Carried to a bare GPU machine (python3 with torch, numpy, scipy, PIL, cv2, yaml) in .gpu/ (git-ignored: carry it):
#   .gpu/whl/      python3 -m pip download -d .gpu/whl --no-deps --only-binary=:all: --python-version 3.12 \
#                    --platform manylinux2014_x86_64 diffusers==0.39.0 huggingface_hub==0.36.2 \
#                    webdataset==1.0.2 braceexpand transformers==4.57.6 tokenizers==0.22.2 importlib_metadata
#   .gpu/fiddata.tgz   tar czf .gpu/fiddata.tgz -C runs/fidelity data   (the 20,000 scenes bench.fidelity wrote)
# DRY=1 runs the same steps on a CPU with tiny budgets (to check the script itself).
set -u
PY=${PY:-python3}
DRY=${DRY:-0}
MIN=${MIN:-6.5}
OUT=${OUT:-gpu-fid}; mkdir -p "$OUT"
W=${WORK:-/tmp/gf}; rm -rf "$W"; mkdir -p "$W"
exec > >(tee -a "$OUT/log.txt") 2>&1
T0=$(date +%s)
el() { echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
if [ "$DRY" = 0 ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  DEV=cuda; GPU=true; LW=${LW:-4}; EXTRA=""
else
  export PYTHONPATH=$PWD
  DEV=cpu; GPU=false; LW=0; MIN=0.2; EXTRA="--eval-scenes 4 --sample-steps 3"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
tar xzf .gpu/fiddata.tgz -C "$W"
el "data: $(ls "$W"/data/shards | wc -l) shards; runs of $MIN minutes on $DEV"

run() {  # run NAME TRAIN-ARGS...: train + score (eta 0), then score again with eta 1
  local name=$1; shift
  local args=(--preset tiny-30 --data "$W/data" --device $DEV --threads 1 $EXTRA --train-arg use_gpu=$GPU
              --train-arg budget_clock=wall --train-arg loader_workers=$LW
              --train-arg sample_every=2000 --train-arg ckpt_every=2000)
  for a in "$@"; do args+=(--train-arg "$a"); done
  $PY -m bench.fidelity --out "$W/$name" --minutes "$MIN" "${args[@]}" > "$OUT/$name.train.log" 2>&1
  cp "$W/$name/fidelity.md" "$OUT/$name.md" 2>/dev/null
  $PY -m bench.fidelity --out "$W/$name" --skip-train --eta 1 --sample-steps 50 "${args[@]}" > "$OUT/$name.eta1.log" 2>&1
  cp "$W/$name/fidelity.md" "$OUT/$name.eta1.md" 2>/dev/null
  # (few files come back from the machine: the grids, loss plot and CSV travel as one archive)
  tar czf "$OUT/$name.tgz" -C "$W/$name" fidelity.json loss.png samples-seen.png samples-held_out.png train/train_log.csv 2>/dev/null
  el "$name done"
}

# SET=compare: three recipes at once (the GPU time-slices between them); SET=maskscale: two mask
# input scales (session 6); SET=big: one recipe alone at batch 512 (0.3 s a step on an H200 vs 0.23 s
# at batch 64 when three share it: more samples per second).
if [ "${SET:-compare}" = compare ]; then
  RUNS=(A-w16 B-preset C-wide)
  run A-w16 batch_size=64 'model_args={"unet": {"block_out_channels": [16, 24, 32]}}' & P1=$!
  run B-preset batch_size=64 & P2=$!
  run C-wide batch_size=64 lr=0.001 'model_args={"unet": {"block_out_channels": [64, 128, 128], "layers_per_block": 2}}' & P3=$!
  wait $P1 $P2 $P3  # (a bare wait would also wait for the tee above)
elif [ "${SET:-}" = maskscale ]; then  # session 6: masks at input scale 0.3 / 0.2 (role_input_scale)
  RUNS=(F-mask030 G-mask020)
  UW='"unet": {"block_out_channels": [16, 24, 32]}'
  run F-mask030 batch_size=64 "model_args={\"role_input_scale\": [1.0, 1.0, 0.3], $UW}" & P1=$!
  run G-mask020 batch_size=64 "model_args={\"role_input_scale\": [1.0, 1.0, 0.2], $UW}" & P2=$!
  wait $P1 $P2
else
  RUNS=(D-b512)
  [ "$DRY" = 0 ] && LW=12
  run D-b512 batch_size=512
fi
for r in "${RUNS[@]}"; do
  echo "##### $r"; tail -3 "$OUT/$r.train.log"
  grep -h "^| shape\|^| outside\|^| fg_col\|^steps" "$OUT/$r.md" "$OUT/$r.eta1.md" 2>/dev/null
done
el "all done"
