"""deploy/k8s: the kustomize base and overlays render (kubectl kustomize, or the base by
hand where kubectl is missing), every core manifest validates against the Kubernetes
schemas (kubernetes-validate, offline), and the policies say what the issue asks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from aiwfe.app.suite import SERVICE_ORDER
from aiwfe.runtime.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.32.0"
SCALED = {"gateway", "cognitive", "taskproc"}
CALLERS = {
    "cognitive": {"gateway", "taskproc"},
    "taskproc": {"gateway"},
    "dataplatform": {"gateway", "cognitive", "taskproc"},
}


def render_base_by_hand() -> list[dict[str, Any]]:
    """The base's resources and generated ConfigMaps, for machines without kubectl."""
    kustomization = yaml.safe_load((K8S / "base/kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / "base" / resource).read_text()) if d]
    for gen in kustomization.get("configMapGenerator", []):
        data = {f: (K8S / "base" / f).read_text() for f in gen.get("files", [])}
        data |= dict(lit.split("=", 1) for lit in gen.get("literals", []))
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    return docs


def render(target: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kubectl:
        cmd = [kubectl, "kustomize", str(K8S / target)]
    elif kustomize:
        cmd = [kustomize, "build", str(K8S / target)]
    elif target == "base":
        return render_base_by_hand()
    else:
        pytest.skip("overlays need kubectl or kustomize")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


# Every overlay in the tree, not a fixed list: a new overlay is checked without edits here.
TARGETS = ["base", *sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir())]
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


@pytest.fixture(scope="module", params=TARGETS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def test_every_core_manifest_validates(rendered) -> None:
    """Each rendered Kubernetes object passes strict schema validation (Istio CRDs are
    checked structurally in their own test)."""
    _, docs = rendered
    for doc in docs:
        if doc["apiVersion"].startswith("security.istio.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_deployments_probes_resources_and_security(rendered) -> None:
    """Four Deployments, each with native gRPC startup/readiness/liveness probes on its
    configured port, requests and limits, and a non-root read-only container."""
    _, docs = rendered
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == set(SERVICE_ORDER)
    settings = load_settings(env={})
    for name, dep in deployments.items():
        port = getattr(settings.services, name).port
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["args"] == ["serve", name]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(
            resources["limits"]
        )
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_every_container_is_bounded_probed_and_locked_down(rendered) -> None:
    """Over every workload of every rendered target, every container (init ones too):
    cpu+memory requests and limits; readiness and liveness probes (long-running ones);
    non-root (pod or container), no privilege escalation, all capabilities dropped, a
    read-only root filesystem; and each workload's pods are covered by a
    PodDisruptionBudget and a NetworkPolicy of their own."""
    target, docs = rendered
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert workloads, target
    pdbs = by_kind(docs, "PodDisruptionBudget").values()
    policies = [p for p in by_kind(docs, "NetworkPolicy").values() if p["spec"]["podSelector"]]
    for doc in workloads:
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        pod = pod_spec(doc)
        pod_sc = pod.get("securityContext", {})
        for kind in ("initContainers", "containers"):
            for c in pod.get(kind, []):
                at = f"{where} container {c['name']}"
                res = c.get("resources", {})
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(bound, {})), f"{at}: {bound}"
                if kind == "containers" and doc["kind"] not in {"Job", "CronJob"}:
                    assert "readinessProbe" in c and "livenessProbe" in c, f"{at}: probes"
                sc = c.get("securityContext", {})
                assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, at
                assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, at
                assert sc.get("allowPrivilegeEscalation") is False, at
                assert sc.get("readOnlyRootFilesystem") is True, at
                assert "ALL" in sc.get("capabilities", {}).get("drop", []), at
        if doc["kind"] in {"Job", "CronJob", "Pod"}:
            continue
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert any(matches(p["spec"]["selector"], labels) for p in pdbs), f"{where}: no PDB"
        assert any(matches(p["spec"]["podSelector"], labels) for p in policies), (
            f"{where}: no NetworkPolicy of its own"
        )


def test_hpa_and_pdbs(rendered) -> None:
    """CPU HPAs for gateway/cognitive/taskproc (not dataplatform, whose replicas multiply
    database connections); a PDB for every service."""
    _, docs = rendered
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == SCALED
    for hpa in hpas.values():
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert hpa["spec"]["maxReplicas"] >= hpa["spec"]["minReplicas"] >= 1
    assert set(by_kind(docs, "PodDisruptionBudget")) == set(SERVICE_ORDER)


def test_network_policies_only_gateway_takes_ingress(rendered) -> None:
    """Ingress is denied by default; the gateway's gRPC port is open; each back end's gRPC
    port admits exactly its callers."""
    _, docs = rendered
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny-ingress"]["spec"]
    assert (
        deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
    )
    settings = load_settings(env={})
    for name in SERVICE_ORDER:
        spec = policies[f"{name}-ingress"]["spec"]
        port = getattr(settings.services, name).port
        grpc_rules = [r for r in spec["ingress"] if {"port": port, "protocol": "TCP"} in r["ports"]]
        (rule,) = grpc_rules
        if name == "gateway":
            assert "from" not in rule
        else:
            sources = {
                p["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for p in rule["from"]
            }
            assert sources == CALLERS[name], name


def test_config_map_secret_and_env_load_as_settings(rendered) -> None:
    """The ConfigMap holds deploy/aiwfe.yaml verbatim; the Secret holds placeholders only;
    each Deployment's env (ConfigMap + own values + secrets) loads as valid settings in
    which it listens on 0.0.0.0 and finds its peers by Service name."""
    _, docs = rendered
    maps = {
        n.rsplit("-", 1)[0] if n.count("-") > 1 else n: d
        for n, d in by_kind(docs, "ConfigMap").items()
    }
    config_text = maps["aiwfe-config"]["data"]["aiwfe.yaml"]
    assert config_text == (ROOT / "deploy/aiwfe.yaml").read_text(), (
        "deploy/k8s/base/aiwfe.yaml drifted: cp deploy/aiwfe.yaml deploy/k8s/base/aiwfe.yaml"
    )
    secret = by_kind(docs, "Secret")["aiwfe-secrets"]
    for key, value in secret["stringData"].items():
        assert value == "" or "REPLACE_ME" in value, f"secret {key} must be a placeholder"
    shared = maps["aiwfe-env"]["data"]
    config_path = ROOT / "deploy/aiwfe.yaml"
    for name, dep in by_kind(docs, "Deployment").items():
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        env = {k: v for k, v in shared.items() if k != "AIWFE_CONFIG"}
        for var in container["env"]:
            # Stand-ins for the operator's real secret values.
            env[var["name"]] = var.get("value", "s" * 40 if "SECRET" in var["name"] else "")
        env = {k: v for k, v in env.items() if v != ""}
        try:
            settings = load_settings(config_path, env=env)
        except ConfigError as exc:
            pytest.fail(f"{name}: {exc}")
        assert getattr(settings.services, name).host == "0.0.0.0"
        for peer in SERVICE_ORDER:
            if peer != name:
                assert getattr(settings.services, peer).host == peer
        assert shared["AIWFE_CONFIG"] == "/etc/aiwfe/aiwfe.yaml"
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["config"] == "/etc/aiwfe"


def test_prod_has_istio_mtls_strict_and_dev_does_not() -> None:
    """The prod overlay adds PeerAuthentication STRICT and an AuthorizationPolicy per
    service; dev runs without the mesh."""
    if not (shutil.which("kubectl") or shutil.which("kustomize")):
        pytest.skip("overlays need kubectl or kustomize")
    prod = render("overlays/prod")
    (peer,) = by_kind(prod, "PeerAuthentication").values()
    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    assert set(by_kind(prod, "AuthorizationPolicy")) == set(SERVICE_ORDER)
    assert all(d["metadata"].get("namespace") == "aiwfe" for d in prod if d["kind"] != "Namespace")
    dev = render("overlays/dev")
    assert not by_kind(dev, "PeerAuthentication")
    assert {d["spec"]["replicas"] for d in by_kind(dev, "Deployment").values()} == {1}


def test_hand_rendered_base_matches_kustomize() -> None:
    """The fallback renderer used without kubectl yields the same objects as kustomize."""
    if not shutil.which("kubectl"):
        pytest.skip("nothing to compare against without kubectl")
    by_hand = {(d["kind"], d["metadata"]["name"]) for d in render_base_by_hand()}
    built = {
        (
            d["kind"],
            d["metadata"]["name"].rsplit("-", 1)[0]
            if d["kind"] == "ConfigMap"
            else d["metadata"]["name"],
        )
        for d in render("base")
    }
    assert by_hand == built
    for doc in render_base_by_hand():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
