#!/bin/bash
# GPU checks of model/ and datagen/ in one call (BENCHMARKS.md "GPU checks"): CUDA training (bf16,
# fp16, --resume), the fidelity benchmark on CUDA, every model backend on CUDA on the tiny checkpoints,
# and real-size random SAM / GroundingDINO / SD inpainting timed. Logs: $OUT/log.txt, $OUT/results.tgz.
#
# Written for a bare GPU machine whose python3 has torch but not this project's other pins: the rest
# travels as wheels in .whl/ (git-ignored: carry it; run from the repo root; weights/tiny from `make tiny-weights`):
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 diffusers==0.39.0 huggingface_hub==0.36.2 webdataset==1.0.2 \
#       braceexpand transformers==4.57.6 tokenizers==0.22.2 segment-anything==1.0 addict yapf platformdirs \
#       supervision==0.6.0 importlib_metadata pycocotools jsonschema jsonschema-specifications referencing rpds-py
#   (groundingdino-py has no wheel on PyPI: copy the one pip built for .venv from pip's cache)
# With a full `make setup` environment instead: PY=.venv/bin/python NOWHEELS=1 bash scripts/gpu_check.sh
# DRY=1 runs the same steps on a CPU with tiny budgets (to check the script itself).
set -u
PY=${PY:-python3}
DRY=${DRY:-0}
T0=$(date +%s)
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
W=${WORK:-/tmp/gc}; rm -rf "$W"; mkdir -p "$W" "$OUT/res"
exec > >(tee -a "$OUT/log.txt") 2>&1
el() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }
if [ "$DRY" = 0 ]; then
  [ "${NOWHEELS:-0}" = 1 ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
  [ "${NOWHEELS:-0}" = 1 ] && export PYTHONPATH=$PWD || export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  DEV=cuda; GPU=0.25; FIDMIN=2.5; STEPS=200; IMGS=64; SDIMGS=16; SIZE=512; SDSTEPS=30
else
  export PYTHONPATH=$PWD
  DEV=cpu; GPU=0; FIDMIN=0.3; STEPS=20; IMGS=2; SDIMGS=1; SIZE=64; SDSTEPS=2
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
$PY -c "import torch, diffusers, transformers, webdataset; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

el "1. train smoke: synthetic-gt shard, $STEPS steps on $DEV (precision auto), resume, fp16"
timeout 40 $PY -m datagen run --config pipelines/synthetic-gt.yaml --shards 1 --samples-per-shard 256 --engine local --out $W/sgt --no-progress 2>&1 | tail -2
G=""; [ "$DRY" = 0 ] && G="--use-gpu"
TA="--data $W/sgt --num-workers 0 --no-progress --no-tensorboard --threads 4 --sample-every $((STEPS/2)) --ckpt-every $((STEPS/2)) --log-every 10"
timeout 60 $PY -m model.train $TA $G --out $W/tr --max-steps $STEPS 2>&1 | tail -4
timeout 60 $PY -m model.train $TA $G --out $W/tr --max-steps $((STEPS + 20)) --resume 2>&1 | tail -2
timeout 60 $PY -m model.train $TA $G --out $W/tr16 --max-steps 40 --precision fp16 2>&1 | tail -2
for d in tr tr16; do echo "-- $d/train_log.csv"; head -2 $W/$d/train_log.csv; tail -2 $W/$d/train_log.csv; done
cp $W/tr/train_log.csv $OUT/res/smoke_train_log.csv 2>/dev/null; cp $W/tr16/train_log.csv $OUT/res/smoke_fp16_log.csv 2>/dev/null
cp $(ls $W/tr/samples/*.png 2>/dev/null | tail -1) $OUT/res/ 2>/dev/null; ls $W/tr/samples $W/tr/checkpoints 2>&1

el "2. fidelity: tiny config on $DEV, batch 64, $FIDMIN wall minutes, eval on $DEV"
FA=""; [ "$DRY" = 1 ] && FA="--train-scenes 200 --shard-size 100 --eval-scenes 4 --sample-steps 3"
timeout 330 $PY -m bench.fidelity --preset tiny-30 --out $W/fid --minutes $FIDMIN --threads 8 --device $DEV $FA \
  --train-arg use_gpu=$([ "$DRY" = 0 ] && echo true || echo false) --train-arg budget_clock=wall --train-arg batch_size=64 2>&1 | grep -v "^wrote" | tail -16
cp $W/fid/fidelity.md $W/fid/fidelity.json $W/fid/loss.png $W/fid/samples-*.png $OUT/res/ 2>/dev/null

el "3a. datagen: every model backend on the tiny checkpoints, num_gpus $GPU per model stage (local engine)"
$PY - <<PYEOF
import yaml
c = yaml.safe_load(open("pipelines/tiny.yaml"))
for s in ("caption", "ground", "segment", "inpaint"):
    c["stages"][s]["num_gpus"] = $GPU
c["source"]["photos"] = False
yaml.safe_dump(c, open("$W/tiny-gpu.yaml", "w"))
PYEOF
timeout 120 $PY -m datagen run --config $W/tiny-gpu.yaml --engine local --shards 1 --out $W/dtiny --no-progress 2>&1 | tail -3
timeout 60 $PY -m manifests validate $W/dtiny 2>&1 | tail -3
timeout 30 $PY -m manifests preview $W/dtiny -n 8 -o $OUT/res/tiny-gpu-preview.png 2>&1 | tail -1

el "3b. full-size random SAM ViT-H, GroundingDINO Swin-T, SD-1.5 inpainting: images/s on $DEV"
timeout 120 $PY -m datagen.tiny_weights.full_size $W/full 2>&1 | tail -8
NG=$([ "$DRY" = 0 ] && echo 1 || echo 0)
timeout 120 $PY -m datagen.tiny_weights.bench_models_sam_gdino --num-gpus $NG --images $IMGS --batch 8 --size $SIZE --threads 8 \
  --sam-checkpoint $W/full/sam_vit_h_random.pth --sam-model-type vit_h \
  --gd-checkpoint $W/full/groundingdino/groundingdino_swint_random.pth --gd-config $W/full/groundingdino/GroundingDINO_SwinT_OGC.py \
  --gd-text-encoder $W/full/groundingdino/bert-base-random 2>&1 | tail -8
timeout 120 $PY -m datagen.tiny_weights.bench_models_blip2_sd --only sd-inpaint --num-gpus $NG --images $SDIMGS --batch 4 --size $SIZE \
  --threads 8 --sd-model $W/full/sd-inpaint-random --steps $SDSTEPS 2>&1 | tail -6
[ "$DRY" = 0 ] && nvidia-smi --query-gpu=memory.used --format=csv
el "done"
tar czf $OUT/results.tgz -C $OUT res && rm -rf $OUT/res
