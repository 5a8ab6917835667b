"""deploy/: every kustomize overlay renders, validates against the Kubernetes schemas
(``kubernetes-validate --strict``), and holds together: references resolve, pods pass the
restricted security profile, probes and resources are set, Spark is configured for the
mode the overlay claims. Custom resources (Strimzi, OpenShift Route) are checked against
small structural schemas of the fields we rely on."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest

_spec = importlib.util.spec_from_file_location("deploy_support", Path(__file__).with_name("deploy_support.py"))
assert _spec and _spec.loader
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)

K8S_VERSION = kubernetes_validate.latest_version()
EXPECTED_OVERLAYS = {"kubernetes", "openshift", "spark-standalone", "external-redis"}

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
_CLUSTER_LABEL = {
    "type": "object", "required": ["labels"],
    "properties": {"labels": {"type": "object", "required": ["strimzi.io/cluster"]}},
}
# The fields of the custom resources that our services and the operator need from us.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("kafka.strimzi.io/v1beta2", "Kafka"): {
        "type": "object", "required": ["spec"],
        "properties": {
            "metadata": {"type": "object", "required": ["name", "annotations"], "properties": {
                "name": _NAME,
                "annotations": {"type": "object", "required": ["strimzi.io/kraft", "strimzi.io/node-pools"],
                                "properties": {"strimzi.io/kraft": {"const": "enabled"},
                                               "strimzi.io/node-pools": {"const": "enabled"}}}}},
            "spec": {"type": "object", "required": ["kafka", "entityOperator"], "properties": {
                "kafka": {"type": "object", "required": ["listeners"], "not": {"required": ["replicas"]},
                          "properties": {
                              "version": {"type": "string"},
                              "listeners": {"type": "array", "minItems": 1, "items": {
                                  "type": "object", "required": ["name", "port", "type", "tls"],
                                  "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
                                                 "port": {"type": "integer", "minimum": 9092},
                                                 "type": {"enum": ["internal", "route", "loadbalancer",
                                                                   "nodeport", "ingress", "cluster-ip"]},
                                                 "tls": {"type": "boolean"}}}},
                              "config": {"type": "object"}}},
                "zookeeper": False,
                "entityOperator": {"type": "object", "required": ["topicOperator"]}}}},
    },
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {
            "metadata": _CLUSTER_LABEL,
            "spec": {"type": "object", "required": ["replicas", "roles", "storage"], "properties": {
                "replicas": {"type": "integer", "minimum": 1},
                "roles": {"type": "array", "items": {"enum": ["controller", "broker"]}, "minItems": 1},
                "storage": {"type": "object", "required": ["type"],
                            "properties": {"type": {"enum": ["jbod", "persistent-claim", "ephemeral"]}}}}}},
    },
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {
            "metadata": _CLUSTER_LABEL,
            "spec": {"type": "object", "required": ["topicName", "partitions", "replicas"], "properties": {
                "topicName": {"type": "string"},
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1},
                "config": {"type": "object"}}}},
    },
    ("route.openshift.io/v1", "Route"): {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "required": ["to", "port"], "properties": {
            "to": {"type": "object", "required": ["kind", "name"],
                   "properties": {"kind": {"const": "Service"}, "name": _NAME}},
            "port": {"type": "object", "required": ["targetPort"]},
            "tls": {"type": "object", "required": ["termination"],
                    "properties": {"termination": {"enum": ["edge", "passthrough", "reencrypt"]},
                                   "insecureEdgeTerminationPolicy": {"enum": ["Allow", "Redirect", "None"]}}}}}},
    },
}


@pytest.fixture(params=ds.OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(overlay: str) -> tuple[dict[str, Any], ...]:
    return ds.render(overlay)


def test_all_overlays_exist() -> None:
    assert set(ds.OVERLAYS) >= EXPECTED_OVERLAYS


def test_overlay_validates_against_kubernetes_schemas(docs: tuple[dict[str, Any], ...]) -> None:
    without_schema = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            without_schema.add((doc["apiVersion"], doc["kind"]))
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    # Only the custom resources lack a built-in schema, and each has ours.
    assert without_schema <= set(CRD_SCHEMAS), without_schema - set(CRD_SCHEMAS)
    for doc in docs:
        schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if schema is not None:
            jsonschema.validate(doc, schema)
    template = ds.executor_pod_template(docs)
    if template is not None:
        kubernetes_validate.validate(template, K8S_VERSION, strict=True)


def test_the_schema_check_has_teeth() -> None:
    docs = ds.render("kubernetes")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicaz": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    topic = next(d for d in docs if d["kind"] == "KafkaTopic")
    with pytest.raises(jsonschema.ValidationError):
        # A topic without the strimzi.io/cluster label is ignored by the operator.
        schema = CRD_SCHEMAS[("kafka.strimzi.io/v1beta2", "KafkaTopic")]
        jsonschema.validate({**topic, "metadata": {"name": "x"}}, schema)


def test_references_resolve(docs: tuple[dict[str, Any], ...]) -> None:
    cms, secrets, services = ds.by_kind(docs, "ConfigMap"), ds.by_kind(docs, "Secret"), ds.by_kind(docs, "Service")
    workloads = {**ds.by_kind(docs, "Deployment"), **ds.by_kind(docs, "StatefulSet")}
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        pods = [w for w in workloads.values()
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert pods, f"Service {name} selects no pods"
        ports = {p.get("name") for w in pods for c in w["spec"]["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: no container port {port['targetPort']}"
    for name, w in workloads.items():
        spec = w["spec"]["template"]["spec"]
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
        for vol in spec.get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in cms, f"{name}: volume {vol['name']}"
        for c in spec["containers"]:
            for source in c.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                assert ref["name"] in (cms if "configMapRef" in source else secrets), f"{name}: {ref}"
            for var in c.get("env", []):
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret = secrets[ref["name"]]
                    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        if spec.get("serviceAccountName"):
            assert spec["serviceAccountName"] in ds.by_kind(docs, "ServiceAccount")
    for hpa in ds.by_kind(docs, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in workloads
    for ing in ds.by_kind(docs, "Ingress").values():
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
    for route in ds.by_kind(docs, "Route").values():
        target = services[route["spec"]["to"]["name"]]
        assert route["spec"]["port"]["targetPort"] in {p["name"] for p in target["spec"]["ports"]}


def _restricted_violations(where: str, spec: dict[str, Any], openshift: bool) -> list[str]:
    """The Pod Security 'restricted' profile, which OpenShift's restricted-v2 SCC also demands;
    on OpenShift no fixed UID/GID either (the SCC assigns them from the project's range)."""
    bad = []
    pod_sc = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            bad.append(f"{where}: {key}")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        bad.append(f"{where}: hostPath volume")
    if openshift:
        bad += [f"{where}: pod {k}" for k in ("runAsUser", "runAsGroup", "fsGroup") if k in pod_sc]
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        sc = c.get("securityContext", {})
        name = f"{where}/{c['name']}"
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot")
        if sc.get("runAsUser", pod_sc.get("runAsUser", 1)) == 0:
            bad.append(f"{name}: runs as UID 0")
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{name}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile")
        if openshift:
            bad += [f"{name}: {k}" for k in ("runAsUser", "runAsGroup") if k in sc]
    return bad


def test_pods_pass_the_restricted_profile(overlay: str, docs: tuple[dict[str, Any], ...]) -> None:
    bad = []
    for where, spec in ds.pod_specs(docs).items():
        bad += _restricted_violations(where, spec, openshift=overlay == "openshift")
    assert not bad


def test_restricted_check_has_teeth() -> None:
    spec = ds.pod_specs(ds.render("kubernetes"))["StatefulSet/streamrec-redis"]
    assert _restricted_violations("redis", spec, openshift=True)  # fixed UID: not on OpenShift
    loose = {"containers": [{"name": "c", "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}
    assert len(_restricted_violations("x", loose, openshift=False)) >= 4


def test_probes_and_resources(docs: tuple[dict[str, Any], ...]) -> None:
    for name, spec in ds.pod_specs(docs).items():
        if name == "ExecutorPodTemplate":  # Spark sets the executors' resources
            continue
        for c in spec["containers"]:
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})) or (
                    kind == "limits" and "memory" in res.get(kind, {})), f"{name}: {kind}"
            assert "livenessProbe" in c, f"{name}: no liveness probe"
    for svc in ("predictor", "frontend"):
        c = ds.by_kind(docs, "Deployment")[f"streamrec-{svc}"]["spec"]["template"]["spec"]["containers"][0]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["readinessProbe"]["httpGet"]["port"] in {p["name"] for p in c["ports"]}


def test_kafka_topics_and_bootstrap_match_the_settings(docs: tuple[dict[str, Any], ...]) -> None:
    common = ds.by_kind(docs, "ConfigMap")["streamrec-common"]["data"]
    (kafka,) = ds.by_kind(docs, "Kafka").values()
    cluster = kafka["metadata"]["name"]
    host, _, port = common["KAFKA_BOOTSTRAP_SERVERS"].partition(":")
    # Strimzi's bootstrap Service is <cluster>-kafka-bootstrap; the listener must be plain.
    assert host == f"{cluster}-kafka-bootstrap"
    listener = next(li for li in kafka["spec"]["kafka"]["listeners"] if li["port"] == int(port))
    assert listener["type"] == "internal" and listener["tls"] is False
    pools = ds.by_kind(docs, "KafkaNodePool").values()
    assert all(p["metadata"]["labels"]["strimzi.io/cluster"] == cluster for p in pools)
    assert {"controller", "broker"} <= {r for p in pools for r in p["spec"]["roles"]}  # KRaft
    topics = {t["spec"]["topicName"]: t for t in ds.by_kind(docs, "KafkaTopic").values()}
    assert set(topics) == {common["RATINGS_TOPIC"], common["DLQ_TOPIC"]}
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == cluster for t in topics.values())
    modeler = ds.by_kind(docs, "ConfigMap")["streamrec-modeler"]["data"]
    # The modeler's partition count assumption agrees with the topic.
    assert topics[common["RATINGS_TOPIC"]]["spec"]["partitions"] >= 1
    assert int(modeler.get("MODEL_NUM_PARTITIONS", "1")) >= 1


def test_in_cluster_urls_name_real_services(docs: tuple[dict[str, Any], ...]) -> None:
    services = ds.by_kind(docs, "Service")
    for name, dep in ds.by_kind(docs, "Deployment").items():
        env = ds.container_env(docs, dep["spec"]["template"]["spec"]["containers"][0])
        redis_url = env.get("REDIS_URL")
        if redis_url is not None and "streamrec-redis" in ds.by_kind(docs, "StatefulSet"):
            assert urlsplit(redis_url).hostname in services, f"{name}: {redis_url}"
        if "PREDICTOR_URL" in env:
            url = urlsplit(env["PREDICTOR_URL"])
            assert url.port in {p["port"] for p in services[url.hostname]["spec"]["ports"]}


def test_modeler_spark_mode_matches_the_overlay(overlay: str, docs: tuple[dict[str, Any], ...]) -> None:
    dep = ds.by_kind(docs, "Deployment")["streamrec-modeler"]
    pod = dep["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = ds.container_env(docs, container)
    conf = ds.spark_defaults(docs)
    assert all(key.startswith("spark.") for key in conf), conf
    conf_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "spark-conf")
    assert conf_dir == "/opt/spark/conf"  # SPARK_CONF_DIR of the modeler image
    submit_args = env["PYSPARK_SUBMIT_ARGS"] or ""
    assert submit_args.split()[-1] == "pyspark-shell"
    defined = [v["name"] for v in container["env"]]
    for ref in re.findall(r"\$\(([A-Z_]+)\)", submit_args):
        assert ref in defined[: defined.index("PYSPARK_SUBMIT_ARGS")], f"$({ref}) is not defined before use"

    if overlay == "spark-standalone":
        assert env["SPARK_MASTER"].startswith("spark://")
        assert not any(k.startswith("spark.kubernetes.") for k in conf)
        assert not ds.by_kind(docs, "Role")
        return

    assert env["SPARK_MASTER"].startswith("k8s://https://")
    # Executors run our image, under the driver's service account, with the restricted template.
    assert conf["spark.kubernetes.container.image"] == container["image"]
    sa = conf["spark.kubernetes.authenticate.driver.serviceAccountName"]
    assert pod["serviceAccountName"] == sa
    template_path = Path(conf["spark.kubernetes.executor.podTemplateFile"])
    assert template_path.parent == Path(conf_dir) and ds.executor_pod_template(docs) is not None
    bindings = [b for b in ds.by_kind(docs, "RoleBinding").values()
                if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in b["subjects"])]
    verbs = {v for b in bindings for rule in ds.by_kind(docs, "Role")[b["roleRef"]["name"]]["rules"]
             if "pods" in rule["resources"] for v in rule["verbs"]}
    assert {"create", "get", "list", "watch", "delete"} <= verbs
    for port in (conf["spark.driver.port"], conf["spark.driver.blockManager.port"]):
        assert int(port) in {p["containerPort"] for p in container["ports"]}
    # Reliable checkpoints: the driver lists the files executors wrote, so a local checkpoint
    # directory must be one ReadWriteMany claim mounted at the same path everywhere.
    checkpoint_dir = env["MODELER_CHECKPOINT_DIR"] or ""
    if "://" not in checkpoint_dir:
        mount = next(m for m in container["volumeMounts"] if checkpoint_dir.startswith(m["mountPath"]))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert "ReadWriteMany" in ds.by_kind(docs, "PersistentVolumeClaim")[claim]["spec"]["accessModes"]
        prefix = "spark.kubernetes.executor.volumes.persistentVolumeClaim."
        names = {k[len(prefix):].split(".")[0] for k in conf if k.startswith(prefix)}
        assert any(conf[f"{prefix}{n}.options.claimName"] == claim
                   and conf[f"{prefix}{n}.mount.path"] == mount["mountPath"] for n in names)


def _spark_strings() -> bytes:
    """The class files of Spark's core and Kubernetes jars, where config keys are constants."""
    import zipfile

    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    chunks = []
    for jar in [*jars.glob("spark-core_*.jar"), *jars.glob("spark-kubernetes_*.jar")]:
        with zipfile.ZipFile(jar) as z:
            chunks += [z.read(n) for n in z.namelist() if n.endswith(".class")]
    return b"\n".join(chunks)


def _known(key: str, strings: bytes) -> bool:
    # Volume keys embed a name we choose: spark.kubernetes.executor.volumes.<type>.<name>.<option>
    m = re.fullmatch(r"(spark\.kubernetes\.(?:driver|executor)\.volumes)\.(\w+)\.[\w-]+\.(.+)", key)
    if m:
        return all(part.encode() in strings for part in m.groups())
    if key.encode() in strings:
        return True
    # Some keys are built as PREFIX + ".suffix" (e.g. the authenticate.driver family).
    parts = key.split(".")
    return any(".".join(parts[:i]).encode() in strings and ".".join(parts[i:]).encode() in strings
               for i in range(2, len(parts)))


def test_spark_settings_are_ones_spark_knows() -> None:
    """A misspelt spark.* key is silently ignored by Spark; look each one up in Spark's jars."""
    keys = set()
    for overlay in ds.OVERLAYS:
        docs = ds.render(overlay)
        keys |= set(ds.spark_defaults(docs))
        container = ds.by_kind(docs, "Deployment")["streamrec-modeler"]["spec"]["template"]["spec"]["containers"][0]
        keys |= set(re.findall(r"--conf (spark\.[\w.]+)=", ds.container_env(docs, container)["PYSPARK_SUBMIT_ARGS"]))
    for svc in ds.compose()["services"].values():
        for value in ds.compose_env(svc).values():
            keys |= set(re.findall(r"-D(spark\.[\w.]+)=", value))
    assert len(keys) > 15
    strings = _spark_strings()
    unknown = sorted(k for k in keys if not _known(k, strings))
    assert not unknown
    assert not _known("spark.kubernetes.executor.podTemplateFiles", strings)  # the lookup has teeth
