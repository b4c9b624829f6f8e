#!/usr/bin/env bash
# The whole GPU verification, in one command for whoever has a CUDA machine (CI has none):
#   1. the GPU tests (pytest -m gpu);
#   2. the host feed at 224 px (benchmarks/feed.py: the old path and Feed against the split resident
#      on the GPU, and resnet18 extraction fed from the file against resident);
#   3. the pipeline's own stages end to end on CUDA at 224 px, in a scratch copy of the repository,
#      then predict on the GPU and with onnxruntime;
#   4. the benchmark at 224 px on CUDA (extraction and fine-tuning against the tutorials' loop).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR   (logs, results and metrics land in OUT_DIR;
#   COMPILE=0 or 1 sets runtime.compile for the pipeline part, which otherwise compiles on CUDA)
# Each part has its own time limit so one that hangs cannot take the others' results with it.
set -u
OUT=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$(command -v "${PYTHON:-python}" || echo "${PYTHON:-python}")
PY=$(realpath -s "$PY" 2>/dev/null || echo "$PY")
cd "$ROOT"
export PYTHONUNBUFFERED=1 TRANSFER_PROGRESS=0

part() { echo; echo "=== $1 ($(date +%T))"; }

part environment
nvidia-smi -L
$PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"

part "pytest -m gpu"
timeout 360 $PY -m pytest -m gpu -p no:cacheprovider -n 0 -q tests/test_gpu.py tests/test_feed.py 2>&1 | tail -15

part "host feed, CUDA, 224 px"
# 20,000 images (3 GB) written to /tmp and read from the page cache; about a minute and a half.
timeout 300 $PY -m benchmarks.feed --device cuda --images 20000 --threads 1 2 4 8 --arch resnet18
cp "$(ls -t benchmarks/results/feed-cuda-*.json | head -1)" "$OUT/" 2>/dev/null

part "pipeline stages on CUDA, 224 px"
work=$(mktemp -d)
tar cf - --exclude=./.git --exclude=./.venv --exclude=./data --exclude=./models --exclude=./logs --exclude=./metrics \
  --exclude='./.[a-z]*' . | tar xf - -C "$work"
cp -r .dvc "$work/" 2>/dev/null
mkdir -p "$work/data/raw" && cp -r data/raw/fashion-mnist data/raw/pretrained "$work/data/raw/"
(
  cd "$work"
  $PY - <<'EOF'
import yaml
p = yaml.safe_load(open("params.yaml"))
p["strategy"] = "finetune"
import os
p["data"].update(image_size=int(os.environ.get("SIZE", 224)), train_per_class=500, eval_per_class=300)
p["finetune"].update(epochs=3, batch_size=64)
p["runtime"].update(device=os.environ.get("DEVICE", "cuda"), workers=8)
if os.environ.get("COMPILE"):  # runtime.compile: null (the default) compiles on CUDA; COMPILE=0 or 1 decides
    p["runtime"]["compile"] = os.environ["COMPILE"] == "1"
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
EOF
  # 300 s a stage: torch.compile's first compile of each graph in extract and finetune is not measured yet.
  for stage in prepare pretrain extract train_head finetune evaluate convert; do
    start=$(date +%s.%N)
    timeout 300 $PY -m stages.$stage || { echo "stage $stage failed"; break; }
    echo "stage $stage: $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}") s"
  done
  mkdir -p pngs && $PY -c "
from PIL import Image; from transfer import storage
t, meta = storage.read_split('data/prepared', 'test')
for i in range(64): Image.fromarray(t['images'][i].permute(1, 2, 0).numpy()).save(f'pngs/{i:02d}_{meta[\"classes\"][int(t[\"labels\"][i])].replace(\"/\", \"-\")}.png')
"
  timeout 120 $PY -m stages.predict pngs --out predictions_cuda.csv > /dev/null && echo "predict (torch, cuda): ok"
  timeout 120 $PY -m stages.predict pngs --onnx --out predictions_onnx.csv > /dev/null && echo "predict (onnxruntime): ok"
  tar czf "$OUT/pipeline.tgz" params.yaml metrics logs predictions_cuda.csv predictions_onnx.csv models/export/model.json 2>/dev/null
  $PY -c "
import json
e = json.load(open('metrics/evaluate/metrics.json')); c = json.load(open('metrics/convert.json'))
print('evaluate:', {k: v for k, v in e.items() if not isinstance(v, dict)})
print('convert:', {k: v for k, v in c.items() if 'agreement' in k or 'diff' in k})
for f in ('logs/prepare_timing.json', 'logs/extract_timing.json', 'logs/finetune_timing.json'): print(f, open(f).read().strip()[:400])
" 2>&1
)
rm -rf "$work"

[ -n "${SKIP_BENCH:-}" ] && exit 0
part "benchmark, CUDA, 224 px"
timeout 420 $PY -m benchmarks.run --device cuda --image-size 224 --skip-dvc
cp "$(ls -t benchmarks/results/cuda-*.json | head -1)" "$OUT/" 2>/dev/null
part done
