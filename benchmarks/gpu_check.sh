#!/usr/bin/env bash
# The GPU checks, as run on a lent CUDA machine (H100/H200 image with CUDA 13, cuDNN 9, PyTorch; no registry).
#   benchmarks/gpu_check.sh PAYLOAD_DIR OUT_DIR
# PAYLOAD_DIR holds what that machine lacks, as parts of one tar (it travelled in pieces): the onnxruntime-gpu 1.31.1
# wheel without its CUDA provider library (pip wants the wheel's real file name back), that library xz-compressed,
# BentoML 1.4.40 and its missing dependencies as wheels (tornado and pyzmq too: BentoML's process manager needs
# them), and a digits bundle. Files come back from at most 8 per call: keep the outputs few.
# Steps, most important first, each with its own time limit (about 8 minutes in all; a step that would start past
# 7 minutes is skipped):
#   1. pytest -m gpu: CUDA sessions, parity with the CPU provider, I/O binding + CUDA graphs captured for every
#      model and batch size, `steerprune bench --device cuda`, a real BentoML server on CUDA answering like the CPU
#      engine over HTTP;
#   2. `steerprune serve` + `steerprune loadtest` on the digits bundle, same load three times: CUDA with I/O binding
#      and CUDA graphs (the defaults), CUDA with --io-binding off (no graphs either), the CPU provider;
#   3. `steerprune bench --device cuda` on the digits bundle (pruned vs full on the GPU);
#   4. `steerprune bench --synthetic deit_small --device cuda` (224 px, 12 x 6 heads, random weights).
set -u
P=$1; O=$2
export PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true BENTOML_HOME=/tmp/bentoml_home
t0=$(date +%s)
step() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

step "assemble payload"
cat $(ls -v "$P"/part*) > /tmp/pay.tar && sha256sum /tmp/pay.tar
mkdir -p /tmp/pay && tar xf /tmp/pay.tar -C /tmp/pay || exit 1
W=/tmp/pay/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl  # pip wants a wheel's real name
mv -f /tmp/pay/ort_nocuda.whl $W 2>/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $W /tmp/pay/bento/*.whl \
  || exit 1
xz -dc -T0 /tmp/pay/cuda.so.xz > /tmp/site/onnxruntime/capi/libonnxruntime_providers_cuda.so || exit 1
echo "$(cat /tmp/pay/cuda.so.sha256)  /tmp/site/onnxruntime/capi/libonnxruntime_providers_cuda.so" | sha256sum -c || exit 1
# steerprune without a build (this copy of the tree only): the stage folders linked in as the subpackages that
# pyproject's package-dir maps them to
for d in training steering export service; do ln -sfn ../$d steerprune/$d; done
export PYTHONPATH=/tmp/site:$PWD
S="python3 -m steerprune.cli"

step "versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import onnxruntime as o, torch, timm, numpy, bentoml; print('ort', o.__version__, o.get_available_providers()); print('torch', torch.__version__, torch.cuda.is_available(), 'timm', timm.__version__, 'numpy', numpy.__version__, 'bentoml', bentoml.__version__)"

step "pytest -m gpu"
timeout 240 python3 -m pytest -q -m gpu tests/ -rs -p no:cacheprovider 2>&1 | tee "$O/pytest_gpu.txt" | tail -12

late() { [ $(( $(date +%s) - t0 )) -gt 420 ] && echo "skipped: past 7 minutes"; }

step "serve + loadtest: CUDA with I/O binding + graphs, CUDA unbound, CPU provider; same bundle, same load"
port=3310
for v in cuda_graph:"--device cuda" cuda_unbound:"--device cuda --io-binding off" cpu:"--device cpu"; do
  name=${v%%:*}; flags=${v#*:}; port=$((port + 1))
  late && break
  echo "--- $name: $flags" | tee -a "$O/serve.log"
  $S serve /tmp/pay/digits_bundle $flags --threads 4 --port $port >> "$O/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 60); do curl -sf http://127.0.0.1:$port/readyz > /dev/null && break; sleep 1; done
  curl -s http://127.0.0.1:$port/routes | python3 -c "import json,sys; b=json.load(sys.stdin); g=b.get('cuda_graph') or {}; print('device', b['device'], sorted({p['providers'][0] for p in b['sessions'].values()}), 'io_binding', (b.get('io_binding') or {}).get('enabled'), 'graphs', g.get('enabled'), {m[-12:]: s for m, s in (g.get('models') or {}).items()})"
  timeout 40 $S loadtest http://127.0.0.1:$port --users 16 --duration 20 --out "$O/loadtest_digits_$name.json" 2>&1 | tail -7
  kill -TERM $pid; wait $pid 2>/dev/null; sleep 2
done

step "bench digits bundle on CUDA"
late || timeout 100 $S bench /tmp/pay/digits_bundle --device cuda --no-torch --batches 1,8,64 --runs 60 --rounds 3 \
  --out "$O/bench_digits_cuda.json" 2>&1 | tail -8

step "bench synthetic DeiT-S on CUDA"
late || timeout 120 $S bench --synthetic deit_small --device cuda --batches 1,8,64 --runs 40 --rounds 2 \
  --out "$O/bench_deit_small_cuda.json" 2>&1 | tail -10
step "done"
