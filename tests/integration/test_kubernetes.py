"""A Kubernetes node: pods plumbed by Debian's real CNI bridge plugin, flannel's and kube-proxy's rules written as
those projects write them, and portguard run as the shipped DaemonSet would run it (its own file system view:
read-only root, the ConfigMap, an emptyDir /run, the node's CNI and flannel directories).

    [pod 10.244.1.x] --cni0-- [node 198.51.100.1] --- [far: outside 198.51.100.2, a pod of another node
                                                       10.244.2.10 (both behind the stateless ACL)]

With the shipped ConfigMap's config, and again with the defaults (everything found in the node's files and
rules): pod -> outside leaves with the node's address, pod -> pod with the pod's, pod -> a ClusterIP service
(DNAT and kube-proxy's mark) with the node's, all with ports >= 49152.  A DaemonSet without a writable /run
cannot start: the view is faithful.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemonproc import PortguardDaemon
from netns import REPO, Netns, wait_for
from podview import PodView
from topology import ACL_LOW, CLIENT_PORTS, NEAR_IP, SERVER_IP, AclNetwork

pytestmark = pytest.mark.netns
MANIFEST = REPO / "deploy" / "kubernetes" / "portguard.yaml"
CLUSTER, POD_CIDR, REMOTE_POD_CIDR, REMOTE_POD = "10.244.0.0/16", "10.244.1.0/24", "10.244.2.0/24", "10.244.2.10"
SERVICE = "10.96.0.10"
SUBNET_ENV = f"FLANNEL_NETWORK={CLUSTER}\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
FLANNEL_CONFLIST = {"name": "cbr0", "cniVersion": "0.3.1", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}
# flanneld --ip-masq (iptables mode) and kube-proxy (iptables mode, a ClusterIP service whose traffic it
# masquerades: masqueradeAll), as `iptables -t nat -S` shows their rules.
FLANNEL_RULES = [
    ["-N", "FLANNEL-POSTRTG"],
    ["-A", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"],
    ["-A", "FLANNEL-POSTRTG", "-m", "mark", "--mark", "0x4000/0x4000", "-j", "RETURN"],
    ["-A", "FLANNEL-POSTRTG", "-s", POD_CIDR, "-d", CLUSTER, "-j", "RETURN"],
    ["-A", "FLANNEL-POSTRTG", "-s", CLUSTER, "-d", POD_CIDR, "-j", "RETURN"],
    ["-A", "FLANNEL-POSTRTG", "!", "-s", CLUSTER, "-d", POD_CIDR, "-j", "RETURN"],
    ["-A", "FLANNEL-POSTRTG", "-s", CLUSTER, "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"],
    ["-A", "FLANNEL-POSTRTG", "!", "-s", CLUSTER, "-d", CLUSTER, "-j", "MASQUERADE", "--random-fully"],
]
KUBE_PROXY_RULES = [
    ["-N", "KUBE-POSTROUTING"], ["-N", "KUBE-MARK-MASQ"], ["-N", "KUBE-SERVICES"], ["-N", "KUBE-SVC-PG"],
    ["-I", "POSTROUTING", "1", "-m", "comment", "--comment", "kubernetes postrouting rules", "-j", "KUBE-POSTROUTING"],
    ["-A", "KUBE-POSTROUTING", "-m", "mark", "!", "--mark", "0x4000/0x4000", "-j", "RETURN"],
    ["-A", "KUBE-POSTROUTING", "-j", "MARK", "--xor-mark", "0x4000"],
    ["-A", "KUBE-POSTROUTING", "-m", "comment", "--comment", "kubernetes service traffic requiring SNAT", "-j",
     "MASQUERADE", "--random-fully"],
    ["-A", "KUBE-MARK-MASQ", "-j", "MARK", "--or-mark", "0x4000"],
    ["-I", "PREROUTING", "1", "-m", "comment", "--comment", "kubernetes service portals", "-j", "KUBE-SERVICES"],
    ["-A", "KUBE-SERVICES", "-d", f"{SERVICE}/32", "-p", "tcp", "--dport", "80", "-j", "KUBE-SVC-PG"],
    ["-A", "KUBE-SVC-PG", "-j", "KUBE-MARK-MASQ"],
    ["-A", "KUBE-SVC-PG", "-p", "tcp", "-j", "DNAT", "--to-destination", f"{REMOTE_POD}:8080"],
]


def _manifest() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, str]]]:
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    spec = next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    return spec["containers"][0], spec["volumes"], maps


@dataclass
class Node:
    ns: Netns
    pod: Netns
    acl: AclNetwork
    view: PodView
    daemon: PortguardDaemon

    def from_pod(self, host: str, port: int = 8080) -> tuple[str, int]:
        """(address, port) the far side saw for one connection from the pod (low source ports forced there)."""
        before = len(self.acl.peers)
        assert self.acl.connect(server=host, port=port, via=self.pod), self.daemon.log_path.read_text()[-2000:]
        assert wait_for(lambda: len(self.acl.peers) > before, 5)
        return self.acl.peers[-1]


def _plumb_pod(node: Netns, pod: Netns, work: Path) -> str:
    """Debian's containernetworking-plugins bridge plugin, as a container runtime calls it: the pod's address."""
    conf = {"cniVersion": "0.4.0", "name": "pgk8s", "type": "bridge", "bridge": "cni0", "isGateway": True,
            "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "subnet": POD_CIDR, "routes": [{"dst": "0.0.0.0/0"}],
                     "dataDir": str(work / "cni-ipam")}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"pg{pod.name.replace('-', '')}", "CNI_NETNS": pod.path,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    out = node.run(["/usr/lib/cni/bridge"], input=json.dumps(conf), env=env)
    return str(json.loads(out.stdout)["ips"][0]["address"]).split("/")[0]


@pytest.fixture(scope="module", params=["configmap", "discovered"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """``configmap``: the shipped ConfigMap's config; ``discovered``: the defaults (no [masquerade] at all)."""
    work = tmp_path_factory.mktemp(f"k8s-{request.param}")
    ns, pod = Netns("pgk8s"), Netns("pgpod")
    acl = AclNetwork(ns)
    view: PodView | None = None
    daemon: PortguardDaemon | None = None
    try:
        ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        acl.far.run(["ip", "addr", "add", f"{REMOTE_POD}/24", "dev", "v-far"])  # a pod on another node
        acl.far.run(["ip", "route", "add", POD_CIDR, "via", NEAR_IP])
        ns.run(["ip", "route", "add", REMOTE_POD_CIDR, "via", SERVER_IP])
        _plumb_pod(ns, pod, work)
        pod.run(["sysctl", "-qw", f"net.ipv4.ip_local_port_range={CLIENT_PORTS}"])
        for rule in FLANNEL_RULES + KUBE_PROXY_RULES:
            table = ["-t", "nat"]
            ns.run(["iptables-nft", *table, *rule])
        fake_node = work / "node"
        (fake_node / "etc/cni/net.d").mkdir(parents=True)
        (fake_node / "etc/cni/net.d/10-flannel.conflist").write_text(json.dumps(FLANNEL_CONFLIST))
        (fake_node / "run/flannel").mkdir(parents=True)
        (fake_node / "run/flannel/subnet.env").write_text(SUBNET_ENV)
        container, volumes, maps = _manifest()
        if request.param == "discovered":
            maps = {name: {"portguard.toml": 'source_ports = "32768-61000"\n'} for name in maps}
        view = PodView(container, volumes, maps, node=fake_node, work=work, extra=[REPO])
        args = list(container["args"])
        daemon = PortguardDaemon(ns, work, launch=lambda env: view.argv(  # type: ignore[union-attr]
            [sys.executable, "-m", "portguard", "run", *args], ns=ns, env=env))
        assert daemon.wait_note("READY=1", 20), daemon.log_path.read_text()[-3000:]
        yield Node(ns, pod, acl, view, daemon)
    finally:
        if daemon is not None:
            daemon.close()
        if view is not None:
            view.close()
        acl.close()
        pod.close()
        ns.close()


def test_pod_to_outside_leaves_with_the_node_address(node: Node) -> None:
    """Leaving the cluster: masqueraded to the node's address (as flannel would), and a high port."""
    addr, port = node.from_pod(SERVER_IP)
    assert addr == NEAR_IP and port >= ACL_LOW, (addr, port)


def test_pod_to_a_pod_on_another_node_keeps_the_pod_address(node: Node) -> None:
    """Staying in the cluster: the pod's own address (flannel returns it untranslated), and a high port."""
    addr, port = node.from_pod(REMOTE_POD)
    assert addr.startswith("10.244.1.") and port >= ACL_LOW, (addr, port)


def test_pod_to_a_cluster_ip_service_leaves_with_the_node_address(node: Node) -> None:
    """DNAT to a pod on another node with kube-proxy's mark: masqueraded, as kube-proxy would, and a high port."""
    addr, port = node.from_pod(SERVICE, 80)
    assert addr == NEAR_IP and port >= ACL_LOW, (addr, port)


def test_doctor_in_the_pod_explains_the_node_and_finds_nothing_uncovered(node: Node) -> None:
    """doctor, run where the DaemonSet runs portguard: kube-proxy's mark, the pod network's translation, the
    bridge cni0 excluded; no masquerade of the node's left uncovered."""
    argv = node.view.argv([sys.executable, "-m", "portguard", "doctor", "--json", "--config",
                           "/etc/portguard/portguard.toml"], ns=node.ns, env={})
    report = json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False).stdout)
    traffic = "\n".join(report["facts"]["traffic"])
    assert "packets marked 0x4000/0x4000 (kube-proxy's masquerade)" in traffic, traffic
    assert f"{CLUSTER}: masqueraded to the egress address" in traffic and "cni0" in traffic, traffic
    assert report["facts"]["uncovered"] == [], report["facts"]["uncovered"]


def test_a_daemonset_without_a_writable_run_could_not_start(node: Node, tmp_path: Path) -> None:
    """The control for the view: the same manifest without its emptyDir /run makes `portguard run` exit 2 on the
    read-only root (the crash loop the emptyDir prevents)."""
    container, volumes, maps = _manifest()
    container = {**container, "volumeMounts": [m for m in container["volumeMounts"] if m["mountPath"] != "/run"
                                               and not m["mountPath"].startswith("/run/")]}
    view = PodView(container, volumes, maps, node=tmp_path / "node", work=tmp_path, extra=[REPO])
    try:
        argv = view.argv([sys.executable, "-m", "portguard", "run", *container["args"]], ns=node.ns, env={})
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2 and "Read-only file system" in proc.stderr + proc.stdout, proc.stderr
    finally:
        view.close()
