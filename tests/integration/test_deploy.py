"""Fleet manifests: each validated against its schema with tools installed here, and checked for
the settings portguard depends on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from netns import REPO

DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)


def test_stack_file_is_valid_compose() -> None:
    """The Swarm stack file validates against the Compose specification's JSON schema."""
    proc = _run(str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                str(DEPLOY / "swarm" / "portguard.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stack_file_runs_global_on_the_host_network_with_two_capabilities() -> None:
    """mode: global, host network, NET_ADMIN/NET_RAW only, the socket's directory read-only, the config as a config."""
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "swarm" / "portguard.yml").read_text())
    svc = doc["services"]["portguard"]
    assert svc["deploy"]["mode"] == "global"
    assert doc["networks"][svc["networks"][0]] == {"external": True, "name": "host"}
    assert svc["cap_drop"] == ["ALL"] and sorted(svc["cap_add"]) == ["NET_ADMIN", "NET_RAW"]
    assert svc["volumes"] == [{"type": "bind", "source": "${DOCKER_RUN_DIR:-/var/run}", "target": "/host-run",
                               "read_only": True}]
    assert svc["environment"]["DOCKER_HOST"] == "unix:///host-run/docker.sock"
    assert svc["configs"][0]["target"] == "/etc/portguard/portguard.toml"
    assert (DEPLOY / "swarm" / doc["configs"]["portguard_toml"]["file"]).exists()


def test_daemonset_validates_against_the_kubernetes_schemas() -> None:
    """kubernetes-validate --strict accepts the ConfigMap and the DaemonSet."""
    proc = _run(str(BIN / "kubernetes-validate"), "--strict", str(DEPLOY / "kubernetes" / "portguard.yaml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == 2, proc.stdout


def test_daemonset_uses_host_network_capabilities_healthz_and_the_configmap() -> None:
    """hostNetwork, NET_ADMIN/NET_RAW, liveness from /healthz on the metrics port, config from the ConfigMap."""
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "portguard.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert spec["hostNetwork"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["ports"][0] == {"name": "metrics", "containerPort": 9640, "protocol": "TCP"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config["metadata"]["name"]
    assert 'listen = "0.0.0.0:9640"' in config["data"]["portguard.toml"]


def test_config_files_in_the_manifests_are_valid_portguard_configs(tmp_path: Path) -> None:
    """The configs shipped in the stack and the ConfigMap load without errors."""
    from portguard.config import load_config

    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "portguard.yaml").read_text()))
    k8s = tmp_path / "k8s.toml"
    k8s.write_text(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["portguard.toml"])
    assert load_config(k8s, env={}).metrics_listen == "0.0.0.0:9640"
    assert load_config(DEPLOY / "swarm" / "portguard.toml", env={}).to_ports.low == 49152


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    """promtool (Debian's prometheus package) checks the rules and runs their unit tests: each alert fires."""
    check = _run("promtool", "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml"))
    assert check.returncode == 0 and "SUCCESS: 5 rules found" in check.stdout, check.stdout + check.stderr
    test = _run("promtool", "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml"))
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr
    alerts = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    tested = {t["alertname"] for t in yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
              ["tests"][0]["alert_rule_test"]}
    assert alerts == tested
