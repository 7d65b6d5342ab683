#!/usr/bin/env bash
# Build the CPU image and run it for real (a benchmark script, not a CI test: it needs root, podman and minutes).
#
#   benchmarks/container_check.sh BUNDLE [OUT_JSON]
#
# Debian packages: podman, buildah, mmdebstrap, runc (apt-get install -y podman buildah mmdebstrap runc).
# Steps: a bookworm base with python3 from mmdebstrap (skipped when the base image exists), `podman build` of the
# CPU variant, a run of the image's own CMD with the bundle mounted read-only, the root filesystem read-only
# (writable tmpfs only at /tmp and BENTOML_HOME, as deploy/kubernetes does it) and port 3000 published on
# 127.0.0.1 only; then: time to /readyz, the
# HEALTHCHECK, answers against the offline ONNX Runtime answers (steerprune.service.engine.Engine in this
# process, on the same PNG bytes), torch absent, no container process running as root, image size, and the time
# `podman stop` takes (SIGTERM drain). Writes OUT_JSON (default benchmarks/results/container_check.json).
#
# Environment: IMAGE (localhost/steerprune:cpu), BASE_IMAGE (localhost/debian-py:bookworm), PY (.venv/bin/python,
# needs the serve extra), PIP_CERT_FILE (the CA bundle pip in the build trusts; default: this machine's pip cert),
# REBUILD=0 to reuse an existing image, PORT (a free port).
# podman's default runtime (crun) fails on these VMs (rlimits, hybrid cgroups): runc + cgroupfs + no default ulimits.
set -euo pipefail

BUNDLE=${1:?usage: benchmarks/container_check.sh BUNDLE [OUT_JSON]}
OUT=${2:-benchmarks/results/container_check.json}
BUNDLE=$(realpath "$BUNDLE")
IMAGE=${IMAGE:-localhost/steerprune:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-py:bookworm}
PY=${PY:-.venv/bin/python}
REBUILD=${REBUILD:-1}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (podman with runc and cgroupfs)" >&2; exit 2; }
for tool in podman mmdebstrap; do command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install podman buildah mmdebstrap runc)" >&2; exit 2; }; done
[ -x /usr/sbin/runc ] || { echo "missing /usr/sbin/runc (apt-get install runc)" >&2; exit 2; }
[ -f "$BUNDLE/manifest.json" ] || { echo "$BUNDLE has no manifest.json (steerprune export RUN --out BUNDLE)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/container-check.XXXXXX)
NAME=steerprune-check-$$
export CONTAINERS_CONF=$WORK/containers.conf
printf '[containers]\ndefault_ulimits = []\n' > "$CONTAINERS_CONF"
PODMAN=(podman --runtime /usr/sbin/runc --cgroup-manager=cgroupfs)
cleanup() { "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
PORT=${PORT:-$("$PY" -c "from steerprune.service.cli import free_port; print(free_port())")}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# 1. base image: Debian bookworm minbase + python3 (no registry needed)
base_s=None
if ! podman image exists "$BASE_IMAGE"; then
  t0=$(now)
  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs.tar" \
    /etc/apt/sources.list.d/debian.sources
  podman import "$WORK/rootfs.tar" "$BASE_IMAGE" >/dev/null
  base_s=$(since "$t0")
fi

# 2. the CPU image; pip in the build trusts this machine's CA bundle through a build secret (never stored)
build_s=None
if [ "$REBUILD" = 1 ] || ! podman image exists "$IMAGE"; then
  cert=${PIP_CERT_FILE:-$(pip config get global.cert 2>/dev/null || echo /etc/ssl/certs/ca-certificates.crt)}
  t0=$(now)
  podman build --isolation=chroot --format docker --secret "id=pip_cert,src=$cert" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg VARIANT=cpu -t "$IMAGE" . > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log"; echo "build failed" >&2; exit 1; }
  build_s=$(since "$t0")
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")

# 3. run: bundle read-only, root fs read-only, 127.0.0.1 only
t0=$(now)
# :U chowns the tmpfs to the container user (podman here ignores mode= on tmpfs); Kubernetes: emptyDir + fsGroup
# the image's own CMD (0.0.0.0:3000 in the container's network namespace), published on 127.0.0.1 only
"${PODMAN[@]}" run -d --name "$NAME" -p "127.0.0.1:$PORT:3000" --read-only --tmpfs /home/steerprune/bentoml:rw,U \
  -v "$BUNDLE:/bundle:ro" "$IMAGE" >/dev/null
ready_s=None
for _ in $(seq 1 1200); do
  if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz")" = 200 ]; then
    ready_s=$(since "$t0"); break
  fi
  [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
  sleep 0.25
done
if [ "$ready_s" = None ]; then podman logs "$NAME" | tail -30; echo "the container never became ready" >&2; exit 1; fi
livez=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/livez")

# 4. inside the image: the HEALTHCHECK, torch, and the uid of every process
health=$("${PODMAN[@]}" healthcheck run "$NAME" >/dev/null 2>&1 && echo healthy || echo unhealthy)
torch=$("${PODMAN[@]}" exec "$NAME" python -c "import importlib.util as u; print(u.find_spec('torch') is not None)")
uids=$("${PODMAN[@]}" exec "$NAME" python -c "
import os
rows = []
for p in filter(str.isdigit, os.listdir('/proc')):
    if int(p) == os.getpid():
        continue
    try:
        st = dict(l.split(':', 1) for l in open(f'/proc/{p}/status'))
        cmd = open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\0', b' ').decode().strip()
    except OSError:
        continue
    rows.append(f'{st[\"Uid\"].split()[0]}:{cmd[:60]}')
print(';'.join(rows))")
rootfs_ro=$("${PODMAN[@]}" exec "$NAME" sh -c 'touch /opt/venv/x 2>/dev/null && echo writable || echo read-only')

# 5. answers over HTTP against the offline ONNX Runtime answers for the same bytes, then the SIGTERM drain
"$PY" - "$BUNDLE" "$PORT" > "$WORK/answers.json" <<'EOF'
import json, sys, urllib.request, uuid
import numpy as np
from steerprune.export.manifest import load_manifest
from steerprune.service.config import ServeConfig
from steerprune.service.engine import FULL, Engine
from steerprune.service.preprocess import InputSpec, decode_image
import io
from PIL import Image

bundle, port = sys.argv[1], int(sys.argv[2])
m = load_manifest(bundle)
spec = InputSpec.from_manifest(m["input"])
with np.load(f"{bundle}/samples.npz") as z:  # the bundle's own sample inputs, back to uint8 pixels
    x = z[[k for k in z.files if z[k].dtype == np.float32 and z[k].ndim == 4][0]]
u8 = np.clip(np.rint((x * spec.std[None] + spec.mean[None]) * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
eng = Engine(ServeConfig(bundle=bundle, verify=False))
hints = [None] + list(m["routes"])
checked, worst, mismatches = 0, 0.0, []
for i in range(min(len(u8), 16)):
    buf = io.BytesIO()
    Image.fromarray(u8[i][..., 0] if u8.shape[-1] == 1 else u8[i]).save(buf, format="PNG")
    png = buf.getvalue()
    hint = hints[i % len(hints)]
    off = eng.run(decode_image(png, spec, 1 << 30)[None], [eng.resolve(hint)])[0]
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode() + png + b"\r\n"]
    fields = {"top_k": str(len(m["classes"]))} | ({"hint": hint} if hint else {})
    parts += [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    req = urllib.request.Request(f"http://127.0.0.1:{port}/classify", data=b"".join(parts) + f"--{b}--\r\n".encode(),
                                 headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    ans = json.load(urllib.request.urlopen(req, timeout=30))
    served = np.array([s["prob"] for s in sorted(ans["scores"], key=lambda s: m["classes"].index(s["label"]))])
    worst = max(worst, float(np.abs(served - off.probs).max()))
    same = ans["index"] == int(off.probs.argmax()) and ans["fallback"] == off.fallback and ans["route"] == (hint or FULL)
    if not same:
        mismatches.append({"hint": hint, "served": ans["index"], "offline": int(off.probs.argmax())})
    checked += 1
print(json.dumps({"answers_checked": checked, "answers_differing": len(mismatches), "max_abs_prob_diff": worst,
                  "mismatches": mismatches[:5]}))
EOF
metrics_ok=$(curl -s "http://127.0.0.1:$PORT/metrics" | grep -c '^steerprune_requests_total' || true)
t1=$(now)
"${PODMAN[@]}" stop -t 30 "$NAME" >/dev/null
stop_s=$(since "$t1")
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")

mkdir -p "$(dirname "$OUT")"
"$PY" - "$OUT" <<EOF
import json, sys
uids = [r.split(":", 1) for r in """$uids""".split(";") if r]
answers = json.load(open("$WORK/answers.json"))
report = {
    "image": "$IMAGE", "base_image": "$BASE_IMAGE", "variant": "cpu", "bundle": "$BUNDLE",
    "image_size_mb": round($size / 1e6, 1), "base_build_s": $base_s, "image_build_s": $build_s,
    "time_to_ready_s": round($ready_s, 2), "livez_status": int("$livez"), "metrics_has_steerprune": $metrics_ok > 0,
    "healthcheck": "$health", "torch_in_image": "$torch" == "True", "root_fs": "$rootfs_ro",
    "process_uids": sorted({int(u) for u, _ in uids}), "processes": [c for _, c in uids],
    "any_process_root": any(int(u) == 0 for u, _ in uids),
    **answers, "stop_s": round($stop_s, 2), "exit_code_after_sigterm": int("$exit_code"),
    "run": "podman --runtime /usr/sbin/runc --cgroup-manager=cgroupfs run -p 127.0.0.1:PORT:3000 --read-only "
           "--tmpfs /home/steerprune/bentoml:rw,U -v BUNDLE:/bundle:ro IMAGE",
}
ok = (report["healthcheck"] == "healthy" and not report["torch_in_image"] and not report["any_process_root"]
      and report["answers_differing"] == 0 and report["metrics_has_steerprune"] and report["max_abs_prob_diff"] < 1e-5 and report["livez_status"] == 200)
report["ok"] = ok
json.dump(report, open(sys.argv[1], "w"), indent=2)
print(json.dumps(report, indent=2))
sys.exit(0 if ok else 1)
EOF
