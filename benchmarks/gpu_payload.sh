#!/usr/bin/env bash
# Build the payload that benchmarks/gpu_check.sh needs on a lent GPU machine (no registry there), split into parts
# small enough to travel one per call (the device tool moves at most 64 MiB per call, the working tree included).
#   benchmarks/gpu_payload.sh BUNDLE [PART_MB]    -> .gpuw/1/part1 .. .gpuw/N/partN (ignore .gpuw/ in .git/info/exclude)
# Then, on one warm machine, carry .gpuw/i in call i (`mkdir -p /tmp/p && cp .gpuw/i/part* /tmp/p/`), and in the last:
#   bash benchmarks/gpu_check.sh /tmp/p $OUT
set -eu
BUNDLE=$1; PART_MB=${2:-47}
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
PIP="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any"
mkdir -p "$W/pay/bento" "$W/ort"
$PIP -d "$W/ort" onnxruntime-gpu==1.31.1
whl=$(ls "$W"/ort/onnxruntime_gpu-*.whl)
lib=onnxruntime/capi/libonnxruntime_providers_cuda.so
(cd "$W/ort" && unzip -q "$whl" $lib && sha256sum $lib | cut -c1-64 > "$W/pay/cuda.so.sha256" &&
  xz -T0 -6 -c $lib > "$W/pay/cuda.so.xz")
cp "$whl" "$W/pay/ort_nocuda.whl" && zip -q -d "$W/pay/ort_nocuda.whl" $lib
# BentoML 1.4.40 and what that image lacks of its dependencies (the image has torch, numpy, aiohttp, httpx, ...)
$PIP -d "$W/pay/bento" bentoml==1.4.40 a2wsgi==1.10.10 aiohttp-asgi-connector==1.2.0 aiosqlite==0.22.1 \
  annotated-types==0.8.0 asgiref==3.13.0 cattrs==23.1.2 click-option-group==0.5.10 httpcore2==2.16.2 \
  httpx-ws==0.9.0 httpx2==2.16.2 kantoku==0.18.3 opentelemetry-api==1.45.1 opentelemetry-instrumentation==0.66b1 \
  opentelemetry-instrumentation-aiohttp-client==0.66b1 opentelemetry-instrumentation-asgi==0.66b1 \
  opentelemetry-sdk==1.45.1 opentelemetry-semantic-conventions==0.66b1 opentelemetry-util-http==0.66b1 \
  pip-requirements-parser==32.0.1 pydantic==2.14.4 pydantic_core==2.50.5 python-json-logger==4.2.0 \
  python-multipart==0.0.34 rich-toolkit==0.20.6 schema==0.7.8 simple-di==0.1.5 starlette==1.10.0 tomli_w==1.2.0 \
  truststore==0.10.5 typing-inspection==0.4.5 uvicorn==0.54.0 watchfiles==1.3.0 wsproto==1.3.2 tornado==6.6.1 \
  pyzmq==27.3.0
cp -r "$BUNDLE" "$W/pay/digits_bundle"
(cd "$W/pay" && tar cf "$W/pay.tar" .)
rm -rf .gpuw && mkdir -p .gpuw
(cd "$W" && split -b $((PART_MB * 1000000)) -d -a 1 pay.tar part)
i=0; for f in "$W"/part?; do i=$((i + 1)); mkdir -p .gpuw/$i; mv "$f" .gpuw/$i/part$i; done
echo "$i parts of at most $PART_MB MB in .gpuw/ (sha256 $(sha256sum "$W/pay.tar" | cut -c1-16)...)"
