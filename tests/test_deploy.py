"""Deployment files checked offline (no container runtime or cluster can run here).

k8s/: both overlays (and the CPU-HPA and CPU-TLS variants) render with `kubectl kustomize`; built-in objects
validate against the Kubernetes schemas (kubernetes-validate --strict), KEDA, Prometheus Operator and cert-manager
objects against their CRD schemas (tests/crd, node); ports, env names, probes, images, metric names and (with
components/tls) certificates, Secrets and mounts agree with the config module, the Dockerfile and the services. docker-compose.yml validates against the Compose schema
and agrees with the same sources.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from services.gateway.routing import parse_targets
from shared import config
from test_packaging import _env as dockerfile_env, _stages as dockerfile_stages

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CRD_DIR = REPO / ".cache" / "crd-validate"

# Deployment / compose service -> (config class, gRPC port, image name, Dockerfile target, `serve` kind)
TIERS = {
    "vision-encoder": (config.EncoderConfig, 50052, "vlsplit-encoder", "vision-encoder", "encoder"),
    "llm-decoder": (config.DecoderConfig, 50053, "vlsplit-decoder", "llm-decoder", "decoder"),
    "gateway": (config.GatewayConfig, 50051, "vlsplit-gateway", "gateway", "gateway"),
}
ALL_NAMES = {config.PREFIX + name.upper() for cls, *_ in TIERS.values() for name in cls.model_fields}


def _names(cls) -> set[str]:
    return {config.PREFIX + name.upper() for name in cls.model_fields}  # deprecated names not allowed


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} not found (kubectl: `.ci/run` installs Debian's package; Python tools: the [test] extra)"
    return path


def render(overlay: str | Path) -> list[dict]:
    out = subprocess.run([_tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def hpa_overlay() -> Path:
    """The CPU overlay with components/hpa instead of components/keda, as the README tells operators
    (written under .cache/, two levels below the root like k8s/overlays/*)."""
    cpu = (REPO / "k8s" / "overlays" / "cpu" / "kustomization.yaml").read_text()
    assert "- ../../components/keda" in cpu
    overlay = REPO / ".cache" / "k8s-cpu-hpa"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "kustomization.yaml").write_text(cpu.replace("../../components/keda", "../../k8s/components/hpa")
                                                .replace("../../base", "../../k8s/base"))
    return overlay


@pytest.fixture(scope="module")
def tls_overlay() -> Path:
    """The CPU overlay with components/tls added, as the README tells operators."""
    cpu = (REPO / "k8s" / "overlays" / "cpu" / "kustomization.yaml").read_text()
    overlay = REPO / ".cache" / "k8s-cpu-tls"
    overlay.mkdir(parents=True, exist_ok=True)
    (overlay / "kustomization.yaml").write_text(
        cpu.replace("  - ../../components/keda", "  - ../../k8s/components/keda\n  - ../../k8s/components/tls")
        .replace("../../base", "../../k8s/base"))
    return overlay


@pytest.fixture(scope="module")
def overlays(hpa_overlay, tls_overlay) -> dict[str, list[dict]]:
    return {"cpu": render("k8s/overlays/cpu"), "gpu": render("k8s/overlays/gpu"), "cpu-hpa": render(hpa_overlay),
            "cpu-tls": render(tls_overlay)}


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def configmap(docs: list[dict]) -> dict[str, str]:
    (cm,) = objects(docs, "ConfigMap").values()
    return cm["data"]


def env_of(deployment: dict, docs: list[dict]) -> dict[str, str | dict]:
    """What the container sees: the ConfigMap (envFrom) overlaid with its own env entries."""
    c = container(deployment)
    assert [ref["configMapRef"]["name"] for ref in c["envFrom"]] == list(objects(docs, "ConfigMap"))
    env = dict(configmap(docs))
    env.update({e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])})
    return env


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "cpu-hpa", "cpu-tls"])
def test_overlay_validates_against_kubernetes_schemas(overlays, overlay, tmp_path):
    docs = overlays[overlay]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = subprocess.run([_tool("kubernetes-validate"), "--strict", "--no-warn", str(path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    builtin = [d for d in docs if "." not in d["apiVersion"].split("/")[0] or d["apiVersion"].count("/") == 0
               or d["apiVersion"].split("/")[0].endswith(".k8s.io")]
    assert out.stdout.count("passed for resource") == len(builtin), out.stdout
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy",
            "PersistentVolumeClaim", "Namespace"} <= {d["kind"] for d in docs}
    assert ("ScaledObject" in {d["kind"] for d in docs}) == (overlay != "cpu-hpa")
    assert ("HorizontalPodAutoscaler" in {d["kind"] for d in docs}) == (overlay == "cpu-hpa")
    assert ("Certificate" in {d["kind"] for d in docs}) == (overlay == "cpu-tls")


@pytest.fixture(scope="module")
def crd_validator() -> Path:
    """tests/crd installed with npm (pinned by its package-lock.json) under .cache/crd-validate."""
    npm = _tool("npm")
    CRD_DIR.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json", "validate.mjs"):
        shutil.copy(REPO / "tests" / "crd" / name, CRD_DIR / name)
    stamp = CRD_DIR / "node_modules" / ".installed-lock"
    lock = (CRD_DIR / "package-lock.json").read_text()
    if not stamp.exists() or stamp.read_text() != lock:
        out = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=CRD_DIR, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        stamp.write_text(lock)
    return CRD_DIR / "validate.mjs"


def validate_crds(validator: Path, docs: list[dict]) -> subprocess.CompletedProcess:
    return subprocess.run([_tool("node"), str(validator)], input=json.dumps(docs), capture_output=True, text=True,
                          cwd=validator.parent, timeout=120)


def test_custom_resources_validate_against_their_crd_schemas(overlays, crd_validator):
    docs = [d for docs in overlays.values() for d in docs]
    sm = yaml.safe_load((REPO / "k8s" / "components" / "servicemonitor" / "servicemonitor.yaml").read_text())
    out = validate_crds(crd_validator, docs + [sm])
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("OK ScaledObject/") == 3 * 3 and "OK ServiceMonitor/vlsplit" in out.stdout  # 3 KEDA overlays
    assert out.stdout.count("OK Certificate/") == 5 and out.stdout.count("OK Issuer/") == 2  # components/tls
    # The validator can fail: a ScaledObject with a misspelt target and a string replica count; a Certificate
    # without an issuer name, a numeric Secret name and an unknown key usage.
    broken = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "broken"},
              "spec": {"scaleTargetRef": {"nme": "x"}, "minReplicaCount": "one", "triggers": []}}
    bad_cert = {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "bad"},
                "spec": {"secretName": 3, "issuerRef": {"nam": "x"}, "usages": ["server authx"]}}
    out = validate_crds(crd_validator, [broken, bad_cert])
    assert out.returncode == 1 and "INVALID ScaledObject/broken" in out.stdout
    assert "INVALID Certificate/bad" in out.stdout and "usages" in out.stdout


@pytest.mark.parametrize("overlay", ["cpu", "gpu", "cpu-tls"])
@pytest.mark.parametrize("name", sorted(TIERS))
def test_deployments_agree_with_config_dockerfile_and_services(overlays, overlay, name):
    docs = overlays[overlay]
    cls, port, image, target, kind = TIERS[name]
    deployment = objects(docs, "Deployment")[name]
    c = container(deployment)
    env = env_of(deployment, docs)
    stages = dockerfile_stages((REPO / "Dockerfile").read_text())
    docker_env = dockerfile_env(stages, target)

    # names: every VLSPLIT_* the pod sees is a setting of some service; its own env entries are its own
    assert {k for k in env if k.startswith(config.PREFIX)} <= ALL_NAMES
    assert {e["name"] for e in c.get("env", []) if e["name"].startswith(config.PREFIX)} <= _names(cls)
    # ports: env, container ports, probes, Service, Dockerfile
    assert env["VLSPLIT_PORT"] == str(port) == docker_env["VLSPLIT_PORT"]
    assert env["VLSPLIT_HOST"] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    expected_ports = {"grpc": port, "metrics": int(env["VLSPLIT_METRICS_PORT"])}
    if kind == "gateway":  # the OpenAI-compatible API and web page
        expected_ports["http"] = int(env["VLSPLIT_HTTP_PORT"])
        assert env["VLSPLIT_HTTP_PORT"] == docker_env["VLSPLIT_HTTP_PORT"]
    # with TLS, probes go to the plaintext health-only port (kubelet's grpc probe cannot do TLS)
    probe_port = int(env["VLSPLIT_HEALTH_PORT"]) if "VLSPLIT_TLS_CERT" in env else port
    assert ("VLSPLIT_TLS_CERT" in env) == ("VLSPLIT_HEALTH_PORT" in env) == (overlay == "cpu-tls")
    if probe_port != port:
        expected_ports["health"] = probe_port
    assert ports == expected_ports
    assert env["VLSPLIT_METRICS_PORT"] == docker_env["VLSPLIT_METRICS_PORT"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == env["VLSPLIT_METRICS_PORT"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": probe_port}, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= (300 if kind != "gateway" else 60)
    service = objects(docs, "Service")[name]
    # the Service routes the API ports; not the health port, and for the public gateway not the metrics port
    public = {k: v for k, v in ports.items() if k != "health" and not (kind == "gateway" and k == "metrics")}
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == public
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"].get("clusterIP") == (None if kind == "gateway" else "None")  # headless for pools
    # image: the Dockerfile target's image, the compose image of the same service
    assert c["image"].split(":")[0] == image
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"][name]
    assert compose["image"].split(":")[0] == image and compose["build"]["target"] == target
    assert f'ENTRYPOINT ["vlsplit", "serve", "{kind}"]' in stages[target]
    assert "args" not in c and "command" not in c  # the image's entrypoint runs
    # drain: the pod gets longer than drain + grace to stop
    spec = deployment["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > float(env["VLSPLIT_DRAIN_S"]) + float(env["VLSPLIT_GRACE_S"])
    # hardening
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert (sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"], sc["capabilities"]) == \
        (False, True, {"drop": ["ALL"]})
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and "memory" in c["resources"]["limits"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "/tmp" in mounts  # the only writable place on a read-only root
    volumes = {v["name"]: v for v in spec["volumes"]}
    if kind == "gateway":
        assert "/models" not in mounts
    else:
        assert mounts["/models"]["readOnly"] is True and env["VLSPLIT_MODEL"] == "/models"
        assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"] == {"claimName": "vlsplit-models",
                                                                               "readOnly": True}
    # the Redis password comes from the Secret, never from the ConfigMap
    if "redis_password" in cls.model_fields:
        assert env["VLSPLIT_REDIS_PASSWORD"] == {"secretKeyRef": {"name": "vlsplit-redis", "key": "password"}}
        assert env["VLSPLIT_CACHE_HMAC_KEY"] == {"secretKeyRef": {"name": "vlsplit-cache", "key": "hmac-key"}}
    assert not {"VLSPLIT_REDIS_PASSWORD", "VLSPLIT_CACHE_HMAC_KEY"} & set(configmap(docs))
    # GPU overlay: one GPU and the CUDA image for the model tiers only
    gpu = c["resources"]["limits"].get("nvidia.com/gpu")
    expect_gpu = overlay == "gpu" and kind != "gateway"
    assert (gpu == 1, c["image"].endswith("-cuda")) == (expect_gpu, expect_gpu)
    if kind != "gateway":
        assert env["VLSPLIT_DEVICE"] == ("cuda" if overlay == "gpu" else "cpu")
    # a disruption budget per tier
    pdbs = [p for p in objects(docs, "PodDisruptionBudget").values()
            if p["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]]
    assert len(pdbs) == 1 and pdbs[0]["spec"]["maxUnavailable"] == 1


def test_gateway_finds_encoders_decoders_and_redis_by_service_name(overlays):
    docs = overlays["cpu"]
    env = configmap(docs)
    services = objects(docs, "Service")
    for setting, tier in (("VLSPLIT_ENCODER", "vision-encoder"), ("VLSPLIT_DECODER", "llm-decoder")):
        (target,) = parse_targets(env[setting], setting)
        assert (target.host, target.port) == (tier, TIERS[tier][1])
        assert services[tier]["spec"]["clusterIP"] == "None"  # DNS answers with every pod: the gateway's pool
    url = urlsplit(env["VLSPLIT_REDIS_URL"])
    assert url.password is None  # the password is in the Secret
    redis = objects(docs, "StatefulSet")["redis"]
    assert url.hostname == redis["spec"]["serviceName"] == "redis"
    assert url.port == services["redis"]["spec"]["ports"][0]["port"]
    args = container(redis)["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert container(redis)["resources"]["limits"]["memory"] == "2Gi"  # above --maxmemory 1536mb


def test_network_policies_isolate_the_model_tier_and_redis(overlays):
    docs = overlays["cpu"]
    policies = objects(docs, "NetworkPolicy")
    pods = {name: d["spec"]["template"]["metadata"]["labels"]
            for name, d in {**objects(docs, "Deployment"), **objects(docs, "StatefulSet")}.items()}

    def selects(selector: dict, labels: dict) -> bool:
        if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []))

    def allowed(pod: str, port: str) -> list:
        """The `from` peers of every policy rule selecting `pod` that opens `port` (by name or number)."""
        peers = []
        for policy in policies.values():
            if not selects(policy["spec"]["podSelector"], pods[pod]):
                continue
            for rule in policy["spec"]["ingress"]:
                if any(str(p["port"]) == port for p in rule.get("ports", [])):
                    peers.append(rule.get("from", "anyone"))
        return peers

    for tier in ("vision-encoder", "llm-decoder"):
        assert allowed(tier, "grpc") == [[{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]]
    monitoring = [[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]]
    for tier in ("vision-encoder", "llm-decoder", "gateway"):  # metrics: the monitoring namespace only
        assert allowed(tier, "metrics") == monitoring, tier
    (redis_peers,) = allowed("redis", "6379")
    (peer,) = redis_peers
    assert [name for name, labels in pods.items() if selects(peer["podSelector"], labels)] != []
    assert all(selects(peer["podSelector"], labels) for labels in pods.values())  # every vlsplit pod, nothing else
    assert allowed("gateway", "grpc") == ["anyone"]


def test_gateway_metrics_are_not_on_the_public_service(overlays):
    """/metrics (per-client counters) is not routed by the Service the API is exposed through; scrapers use
    gateway-metrics, which the NetworkPolicy opens to the monitoring namespace only (test above)."""
    for overlay in ("cpu", "gpu", "cpu-tls"):
        docs = overlays[overlay]
        services = objects(docs, "Service")
        gateway = objects(docs, "Deployment")["gateway"]
        assert "metrics" not in {p["name"] for p in services["gateway"]["spec"]["ports"]}
        assert 9100 not in {p["port"] for p in services["gateway"]["spec"]["ports"]}
        scrape = services["gateway-metrics"]
        assert scrape["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
        assert scrape["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics"}]
        assert {p["name"]: p["containerPort"] for p in container(gateway)["ports"]}["metrics"] == 9100
    monitor = yaml.safe_load((REPO / "k8s" / "components" / "servicemonitor" / "servicemonitor.yaml").read_text())
    (expr,) = monitor["spec"]["selector"]["matchExpressions"]
    labels = objects(overlays["cpu"], "Service")["gateway-metrics"]["metadata"]["labels"]
    assert labels[expr["key"]] in expr["values"] and monitor["spec"]["endpoints"][0]["port"] == "metrics"


def _mount_of(c: dict, spec: dict, path: str) -> tuple[dict, dict]:
    """(volumeMount, volume) holding the file `path` of container `c`."""
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_tls_component_wires_certificates_secrets_env_and_health_probes(overlays):
    """components/tls: each tier's TLS files are the keys of the Secret its Certificate writes, mounted whole
    (rotations reach the files), for the Service names it is called by; encoders and decoders require the
    gateway's client certificate, from the same CA; probes use the plaintext health port."""
    docs = overlays["cpu-tls"]
    namespace = objects(docs, "Namespace")
    (ns,) = namespace
    certs = {c["spec"]["secretName"]: c for c in objects(docs, "Certificate").values()}
    issuers = objects(docs, "Issuer")
    services = objects(docs, "Service")
    deployments = objects(docs, "Deployment")
    # the chain: self-signed -> CA certificate -> CA issuer, which signs every service certificate
    (ca_cert,) = [c for c in certs.values() if c["spec"].get("isCA")]
    assert issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    for cert in certs.values():
        ref = cert["spec"]["issuerRef"]
        assert ref["kind"] == "Issuer" and ref["name"] in issuers and ref.get("group", "cert-manager.io") == \
            "cert-manager.io"
        assert cert["metadata"]["namespace"] == ns
    ca_issuer = [name for name, i in issuers.items() if i["spec"].get("ca", {}).get("secretName") ==
                 ca_cert["spec"]["secretName"]]
    assert len(ca_issuer) == 1

    def secret_file(name: str, path: str) -> tuple[dict, str]:
        """The Certificate behind the file `path` the container of `name` reads, and the file's Secret key."""
        c, spec = container(deployments[name]), deployments[name]["spec"]["template"]["spec"]
        mount, volume = _mount_of(c, spec, path)
        assert mount["readOnly"] is True and "subPath" not in mount  # whole directory: rotations arrive
        assert volume["secret"]["defaultMode"] & 0o040 and spec["securityContext"]["fsGroup"] == 10001
        key = path[len(mount["mountPath"].rstrip("/")) + 1:]
        assert key in ("tls.crt", "tls.key", "ca.crt")  # what cert-manager writes into a Secret
        return certs[volume["secret"]["secretName"]], key

    gateway_env = env_of(deployments["gateway"], docs)
    for name in TIERS:
        env = env_of(deployments[name], docs)
        cert, key = secret_file(name, env["VLSPLIT_TLS_CERT"])
        assert key == "tls.crt" and secret_file(name, env["VLSPLIT_TLS_KEY"]) == (cert, "tls.key")
        assert "server auth" in cert["spec"]["usages"] and "client auth" not in cert["spec"]["usages"]
        dns = cert["spec"]["dnsNames"]
        assert {name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"} <= set(dns)
        assert name in services
        assert cert["spec"]["issuerRef"]["name"] == ca_issuer[0]
        # the plaintext health port: its own container port, not routed by the Service
        health = int(env["VLSPLIT_HEALTH_PORT"])
        assert health not in {p["port"] for p in services[name]["spec"]["ports"]}
        assert {c["name"]: c["containerPort"] for c in container(deployments[name])["ports"]}["health"] == health
        if name == "gateway":
            # public clients present no certificate (tokens authenticate them): no client CA on its ports
            assert "VLSPLIT_TLS_CLIENT_CA" not in env
            continue
        assert secret_file(name, env["VLSPLIT_TLS_CLIENT_CA"]) == (cert, "ca.crt")  # the CA that signed both
        # the gateway dials this tier by its Service name and checks it against this certificate
        setting = {"vision-encoder": "VLSPLIT_ENCODER", "llm-decoder": "VLSPLIT_DECODER"}[name]
        (target,) = parse_targets(gateway_env[setting], setting)
        assert target.host in dns and "VLSPLIT_UPSTREAM_TLS_SERVER_NAME" not in gateway_env
    # the gateway's client side: the CA of the tiers' certificates, and a client-auth certificate from it
    client, key = secret_file("gateway", gateway_env["VLSPLIT_UPSTREAM_TLS_CERT"])
    assert key == "tls.crt" and secret_file("gateway", gateway_env["VLSPLIT_UPSTREAM_TLS_KEY"]) == (client, "tls.key")
    assert secret_file("gateway", gateway_env["VLSPLIT_UPSTREAM_TLS_CA"])[1] == "ca.crt"
    assert client["spec"]["usages"][-1] == "client auth" and "server auth" not in client["spec"]["usages"]
    assert client["spec"]["issuerRef"]["name"] == ca_issuer[0]
    # without the component: no TLS setting anywhere
    for deployment in objects(overlays["cpu"], "Deployment").values():
        assert not any(k.startswith(("VLSPLIT_TLS_", "VLSPLIT_UPSTREAM_TLS_", "VLSPLIT_HEALTH_PORT"))
                       for k in env_of(deployment, overlays["cpu"]))


def test_autoscaling_targets_and_metrics_exist(overlays):
    import prometheus_client

    import services.llm_decoder.metrics  # noqa: F401 - registers the decoder's metrics
    import services.vision_encoder.cached_encoder  # noqa: F401 - registers the encoder's metrics

    registered = set(prometheus_client.REGISTRY._names_to_collectors)
    for overlay in ("cpu", "gpu"):
        docs = overlays[overlay]
        deployments = objects(docs, "Deployment")
        scaled = objects(docs, "ScaledObject")
        assert set(scaled) == set(deployments)
        for name, so in scaled.items():
            assert so["spec"]["scaleTargetRef"]["name"] in deployments
            for trigger in so["spec"]["triggers"]:
                if trigger["type"] == "prometheus":
                    metrics = re.findall(r"\b(vlsplit_[a-z_]+)\{", trigger["metadata"]["query"])
                    assert metrics and set(metrics) <= registered, metrics
                    assert f'namespace="{so["metadata"]["namespace"]}"' in trigger["metadata"]["query"]
        assert {n for n, s in scaled.items() if s["spec"]["triggers"][0]["type"] == "prometheus"} == \
            {"vision-encoder", "llm-decoder"}
    hpas = objects(overlays["cpu-hpa"], "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == set(objects(overlays["cpu-hpa"],
                                                                                       "Deployment"))
    for deployment in objects(overlays["cpu"], "Deployment").values():
        assert "replicas" not in deployment["spec"]  # the autoscaler owns the count; `apply` must not reset it


def test_readme_tells_how_to_create_every_secret_the_pods_read(overlays):
    readme = (REPO / "README.md").read_text()
    refs = {(ref["name"], ref["key"]) for d in objects(overlays["cpu"], "Deployment").values()
            for e in container(d).get("env", []) if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}
    assert refs == {("vlsplit-redis", "password"), ("vlsplit-cache", "hmac-key")}
    for name, key in refs:
        assert f"kubectl -n vlsplit create secret generic {name} --from-literal={key}=" in readme


# ---- docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_validates_against_the_compose_schema():
    out = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _compose_env(service: dict, compose: dict) -> dict[str, str]:
    env = {}
    for key, value in service.get("environment", {}).items():
        env[key] = str(value)
    return env


@pytest.mark.parametrize("name", sorted(TIERS))
def test_compose_services_agree_with_config_and_dockerfile(compose, name):
    cls, port, image, target, kind = TIERS[name]
    service = compose["services"][name]
    env = _compose_env(service, compose)
    assert {k for k in env if k.startswith(config.PREFIX)} <= _names(cls)
    assert env["VLSPLIT_PORT"] == str(port)
    health = service["healthcheck"]["test"]
    assert health == ["CMD", "vlsplit", "health", f"localhost:{port}"]
    assert service["build"] == {"context": ".", "target": target}
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    stop = int(service["stop_grace_period"].rstrip("s"))
    assert stop > float(env["VLSPLIT_DRAIN_S"]) + float(env["VLSPLIT_GRACE_S"])
    if kind == "gateway":
        assert service["ports"] == ["${GATEWAY_PORT:-50051}:" + str(port),
                                    "${GATEWAY_HTTP_PORT:-8080}:" + env["VLSPLIT_HTTP_PORT"]]
        for setting, tier in (("VLSPLIT_ENCODER", "vision-encoder"), ("VLSPLIT_DECODER", "llm-decoder")):
            (target_,) = parse_targets(env[setting], setting)
            assert (target_.host, target_.port) == (tier, TIERS[tier][1])
            assert "ports" not in compose["services"][tier]  # no fixed host port: `--scale` works
    else:
        (volume,) = service["volumes"]
        assert volume.endswith(":/models:ro") and env["VLSPLIT_MODEL"] == "/models"
    if "redis_url" in cls.model_fields:
        url = urlsplit(env["VLSPLIT_REDIS_URL"])
        assert url.hostname == "redis" and url.password is None
        assert service["env_file"] == ".env"  # VLSPLIT_REDIS_PASSWORD


def test_compose_redis_is_a_bounded_cache_with_a_password(compose):
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    for flag in ('--requirepass "$$VLSPLIT_REDIS_PASSWORD"', "--maxmemory-policy allkeys-lru", '--save ""',
                 "--appendonly no", "--maxmemory "):
        assert flag in command, flag
    assert "ports" not in redis
    example = (REPO / ".env.example").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", (REPO / "docker-compose.yml").read_text()))
    defined = set(re.findall(r"^(\w+)=", example, flags=re.M))
    assert required | {"VLSPLIT_REDIS_PASSWORD"} <= defined
    assert ".env" in (REPO / ".gitignore").read_text().split()
