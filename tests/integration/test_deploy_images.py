"""The Dockerfiles agree with pyproject.toml, the services and the places that run them:
right extras, no Java/pyspark in the slim images, non-root arbitrary-UID friendly, health
checks on the services' own endpoints, and every streamrec image that compose or the
manifests reference is built by one of them. Also runs the modeler entrypoint's Kubernetes
executor branch against a stand-in ``java``."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("deploy_support", Path(__file__).with_name("deploy_support.py"))
assert _spec and _spec.loader
ds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ds)

PYPROJECT = tomllib.loads((ds.ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
ENTRYPOINT = ds.ROOT / "deploy" / "docker" / "modeler-entrypoint.sh"
PORT_FIELD = {"predictor": "predictor_port", "frontend": "frontend_port"}


def _req_name(req: str) -> str:
    return re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def _extra_of(service: str) -> str:
    """The optional-dependency group the Dockerfile installs."""
    runs = [args for word, args in ds.dockerfile_instructions(service) if word == "RUN"]
    found = {m for args in runs for m in re.findall(r"optional-dependencies'\]\[sys\.argv\[1\]\]\)\)\"\s+(\w+)", args)}
    found |= {m for args in runs for m in re.findall(r"pip install [^&]*'\.\[(\w+)\]'", args)}
    assert len(found) == 1, f"{service}/Dockerfile installs extras {found}"
    return found.pop()


@pytest.mark.parametrize("service", ds.SERVICES)
def test_dockerfile_installs_the_services_extra(service: str) -> None:
    extra = _extra_of(service)
    assert extra == service and extra in PYPROJECT["optional-dependencies"]
    runs = " ".join(args for word, args in ds.dockerfile_instructions(service) if word == "RUN")
    # The code goes in without re-resolving dependencies, so the image holds exactly the pins.
    assert "pip install --no-deps ." in runs
    copied = [args.split()[0] for word, args in ds.dockerfile_instructions(service)
              if word == "COPY" and "--from" not in args]
    assert "pyproject.toml" in copied and "common" in copied and service in copied
    for src in copied:
        assert (ds.ROOT / src).exists(), f"{service}/Dockerfile copies missing {src}"
        kept = [line[1:].removesuffix("/**") for line in (ds.ROOT / ".dockerignore").read_text().splitlines()
                if line.startswith("!")]
        assert any(src == k or src.startswith(k + "/") for k in kept), f".dockerignore excludes {src}"


@pytest.mark.parametrize("service", ["predictor", "frontend"])
def test_slim_images_have_neither_java_nor_pyspark(service: str) -> None:
    text = " ".join(f"{w} {a}" for w, a in ds.dockerfile_instructions(service)).lower()  # not comments
    for word in ("java", "jre", "jdk", "temurin", "pyspark", "spark"):
        assert word not in text, f"{service}/Dockerfile mentions {word}"
    names = {_req_name(r) for r in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"][service]}
    assert "pyspark" not in names
    # Nor anything that pulls pyspark in (installed metadata of every pinned requirement).
    for name in names:
        requires = importlib.metadata.requires(name) or []
        assert not any(_req_name(r) == "pyspark" and "extra ==" not in r for r in requires), name


def test_modeler_image_has_java_17_and_spark_on_path() -> None:
    final = ds.final_stage("modeler")
    env = " ".join(args for word, args in final if word == "ENV")
    assert "JAVA_HOME=/opt/java/openjdk" in env
    assert "SPARK_HOME=/opt/venv/lib/python3.11/site-packages/pyspark" in env
    assert "${SPARK_HOME}/bin" in env  # spark-class for the standalone master/worker
    froms = [args for word, args in ds.dockerfile_instructions("modeler") if word == "FROM"]
    args = dict(a.split("=", 1) for word, a in ds.dockerfile_instructions("modeler") if word == "ARG" and "=" in a)
    jre = args["JRE_IMAGE"]
    assert re.fullmatch(r"eclipse-temurin:17[-.\w]*", jre), jre
    assert any("${JRE_IMAGE}" in f for f in froms)
    assert args["PYTHON_IMAGE"].startswith("python:3.11")


@pytest.mark.parametrize("service", ds.SERVICES)
def test_image_runs_non_root_with_a_health_check(service: str) -> None:
    final = ds.final_stage(service)
    users = [args for word, args in final if word == "USER"]
    assert users, f"{service}: no USER"
    uid, _, gid = users[-1].partition(":")
    # Numeric (runAsNonRoot can verify it) and group 0 (OpenShift's arbitrary UIDs are in it).
    assert uid.isdigit() and int(uid) >= 1000 and gid == "0"
    runs = " ".join(args for word, args in final if word == "RUN")
    assert "chgrp" in runs and "g=u" in runs
    (health,) = [args for word, args in final if word == "HEALTHCHECK"]
    cmd = json.loads(health.split("CMD", 1)[1])
    if service in PORT_FIELD:
        field = ds.settings_class(service).model_fields[PORT_FIELD[service]]
        assert "/healthz" in cmd[-1]
        assert f"'{field.alias}', '{field.default}'" in cmd[-1], "health check must use the service's port setting"
        exposed = [args for word, args in final if word == "EXPOSE"]
        assert str(field.default) in " ".join(exposed).split()
    else:
        field = ds.settings_class("modeler").model_fields["metrics_port"]
        assert "/metrics" in cmd[-1] and f"'{field.alias}', '{field.default}'" in cmd[-1]
    (command,) = [json.loads(args) for word, args in final if word == "CMD"]
    assert command == ["python", "-m", service]
    assert (ds.ROOT / service / "__main__.py").exists()


def _our_images() -> list[tuple[str, str]]:
    """(where, image) for every streamrec image compose and the rendered manifests use."""
    found = []
    for name, svc in ds.compose()["services"].items():
        found.append((f"compose:{name}", svc["image"]))
    for overlay in ds.OVERLAYS:
        docs = ds.render(overlay)
        for where, spec in ds.pod_specs(docs).items():
            for c in spec.get("containers", []):
                if "image" in c:
                    found.append((f"{overlay}:{where}", c["image"]))
        conf = ds.spark_defaults(docs)
        if "spark.kubernetes.container.image" in conf:
            found.append((f"{overlay}:spark executors", conf["spark.kubernetes.container.image"]))
    return [(w, i) for w, i in found if i.startswith(f"{ds.IMAGE_REPO}/")]


def test_every_streamrec_image_is_built_by_a_dockerfile() -> None:
    images = _our_images()
    assert {i.split(":")[0] for _, i in images} == {f"{ds.IMAGE_REPO}/{s}" for s in ds.SERVICES}
    for where, image in images:
        service = image.split("/", 1)[1].split(":")[0]
        assert (ds.ROOT / service / "Dockerfile").exists(), f"{where}: {image}"
    for name, svc in ds.compose()["services"].items():
        if "build" in svc:
            service = svc["image"].split("/", 1)[1].split(":")[0]
            assert svc["build"]["dockerfile"] == f"{service}/Dockerfile", name
            assert svc["build"].get("context", ".") == "."


def _imports(module: str) -> set[str]:
    """Top-level modules imported (at any depth) by ``module`` and the project modules it uses."""
    seen, todo, external = set(), [module], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = ds.ROOT / (mod.replace(".", "/") + ".py")
        if not path.exists():
            path = ds.ROOT / mod.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue
        parents = mod.split(".")
        todo += [".".join(parents[:i]) for i in range(1, len(parents))]  # package __init__s
        tree = ast.parse(path.read_text(encoding="utf-8"))
        # `try: import x / except ImportError:` is an optional import with a fallback.
        optional = {
            id(inner) for node in ast.walk(tree) if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers)
            for stmt in node.body for inner in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in ds.SETTINGS_CLASSES or top in ("common", "devstack"):
                    todo.append(name)
                else:
                    external.add(top)
    return external - set(sys.stdlib_module_names) - {"__future__"}


def test_loader_runs_on_the_modeler_image() -> None:
    """compose's loader runs predictor.load_catalog and modeler.replay on the modeler image:
    everything they import must be installed by the modeler extra."""
    loader = " ".join(ds.compose()["services"]["loader"]["command"])
    modules = re.findall(r"python -m ([\w.]+)", loader)
    assert set(modules) == {"predictor.load_catalog", "modeler.replay"}
    installed = {_req_name(r) for r in PYPROJECT["dependencies"] + PYPROJECT["optional-dependencies"]["modeler"]}
    dists = importlib.metadata.packages_distributions()
    for module in modules:
        for top in _imports(module):
            owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
            # Each distribution's own dependencies come with it.
            deps = {_req_name(r) for d in installed for r in (importlib.metadata.requires(d) or [])
                    if "extra ==" not in r}
            assert owners & (installed | deps), f"{module} imports {top}, not in the modeler image"


def _fake_java(tmp_path: Path) -> Path:
    java_home = tmp_path / "jdk"
    (java_home / "bin").mkdir(parents=True)
    java = java_home / "bin" / "java"
    java.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    java.chmod(0o755)
    return java_home


def test_entrypoint_starts_a_kubernetes_executor(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ["PATH"], "JAVA_HOME": str(_fake_java(tmp_path)), "SPARK_HOME": "/opt/spark-home",
        "SPARK_CONF_DIR": "/opt/spark/conf",
        "SPARK_EXECUTOR_MEMORY": "1024m", "SPARK_DRIVER_URL": "spark://CoarseGrainedScheduler@10.0.0.5:7078",
        "SPARK_EXECUTOR_ID": "3", "SPARK_EXECUTOR_CORES": "1", "SPARK_APPLICATION_ID": "spark-abc",
        "SPARK_EXECUTOR_POD_IP": "10.0.0.9", "SPARK_RESOURCE_PROFILE_ID": "0",
        "SPARK_EXECUTOR_POD_NAME": "streamrec-executor-3",
        # Spark numbers the JVM options; 10 sorts after 2, and a value may hold spaces.
        "SPARK_JAVA_OPT_0": "-Dspark.driver.port=7078",
        "SPARK_JAVA_OPT_2": "-Dx=a b",
        "SPARK_JAVA_OPT_10": "--add-opens=java.base/java.nio=ALL-UNNAMED",
    }
    run = subprocess.run([str(ENTRYPOINT), "executor"], env=env, capture_output=True, text=True, timeout=30,
                         check=False)
    assert run.returncode == 0, run.stderr
    argv = run.stdout.splitlines()
    assert argv[:3] == ["-Dspark.driver.port=7078", "-Dx=a b", "--add-opens=java.base/java.nio=ALL-UNNAMED"]
    assert argv[3:5] == ["-Xms1024m", "-Xmx1024m"]
    assert argv[argv.index("-cp") + 1] == "/opt/spark/conf:/opt/spark-home/jars/*"
    main = argv.index("org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend")
    flags = dict(zip(argv[main + 1 :: 2], argv[main + 2 :: 2], strict=True))
    assert flags == {
        "--driver-url": env["SPARK_DRIVER_URL"], "--executor-id": "3", "--cores": "1", "--app-id": "spark-abc",
        "--hostname": "10.0.0.9", "--resourceProfileId": "0", "--podName": "streamrec-executor-3",
    }
    # The class exists in the pyspark this project pins (so the image can run it).
    jars = Path(importlib.util.find_spec("pyspark").origin).parent / "jars"  # type: ignore[union-attr]
    assert list(jars.glob("spark-kubernetes_*.jar"))


def test_entrypoint_passes_other_commands_through(tmp_path: Path) -> None:
    run = subprocess.run([str(ENTRYPOINT), "python", "-c", "import sys; print(sys.argv[1:])", "a b"],
                         env={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                         capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "['a b']"


def test_health_check_commands_are_valid_python() -> None:
    """The images have no curl: health checks are `python -c` one-liners; they must compile."""
    snippets = []
    for service in ds.SERVICES:
        for word, args in ds.final_stage(service):
            if word == "HEALTHCHECK":
                snippets.append((service, json.loads(args.split("CMD", 1)[1])))
    for name, svc in ds.compose()["services"].items():
        test = (svc.get("healthcheck") or {}).get("test") or []
        if test[:1] == ["CMD"]:
            snippets.append((name, test[1:]))
    python = [(where, cmd) for where, cmd in snippets if cmd[0] == "python"]
    assert len(python) >= 6
    for where, cmd in python:
        assert cmd[1] == "-c", where
        compile(cmd[2], f"<{where} health check>", "exec")
        assert "127.0.0.1" in cmd[2] and "timeout=" in cmd[2], where


@pytest.mark.parametrize("service", ds.SERVICES)
def test_dockerfile_parses_and_lints_clean(service: str) -> None:
    """BuildKit's own parser accepts the file (and agrees with ours); hadolint finds nothing."""
    import dockerfile

    path = ds.ROOT / service / "Dockerfile"
    parsed = [c.cmd.upper() for c in dockerfile.parse_file(str(path))]
    assert parsed == [word for word, _ in ds.dockerfile_instructions(service)]
    lint = subprocess.run([str(Path(sys.executable).with_name("hadolint")), "--no-color", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_hadolint_has_teeth(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    lint = subprocess.run([str(Path(sys.executable).with_name("hadolint")), "--no-color", str(bad)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert lint.returncode != 0 and "DL3006" in lint.stdout


def test_entrypoint_passes_shellcheck() -> None:
    check = subprocess.run([str(Path(sys.executable).with_name("shellcheck")), "--shell=sh", str(ENTRYPOINT)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
