"""Checks of deploy/ that need Python packages; run by `cargo xtask test` with the venv
that xtask's bootstrap installs under target/ (see xtask/src/deploy.rs).

  operator-resources FILE...
      prometheus-operator resources (ServiceMonitor, ...) against the operator's CRD
      schema, as the cloudcoil models carry it. kubernetes-validate has no schema for
      custom resources. Models accept unknown fields, so a field the model drops on a
      round trip (a typo, a field of another version) is reported too.

  pod-policy DAEMONSET SERVICEMONITOR SCRAPE_CONFIG
      What the DaemonSet promises an operator, asserted: nothing unauthenticated off the
      node (a web config from a Secret, HTTPS probes on /healthz, HTTPS + basic auth in
      both scrape configurations), capabilities dropped to the daemon's six, no privilege
      escalation, a read-only root, every host path read-only, the host's cgroupfs.

  pod-run DAEMONSET
      The DaemonSet's one container as JSON (args, env, capabilities, host namespaces,
      mounts by source), for xtask to run the image the same way with podman.

  scrape-config IN OUT
      Debian's promtool is built without Kubernetes service discovery. Writes IN to OUT
      with each job's kubernetes_sd_configs (checked here against the fields Prometheus
      documents) replaced by a static target, so promtool can check everything else.
"""

import json
import sys

import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1

OPERATOR_KINDS = {
    "ServiceMonitor": v1.ServiceMonitor,
    "PodMonitor": v1.PodMonitor,
    "PrometheusRule": v1.PrometheusRule,
}

KUBERNETES_SD_FIELDS = {
    "role", "api_server", "kubeconfig_file", "namespaces", "selectors", "attach_metadata",
    "basic_auth", "authorization", "oauth2", "tls_config", "proxy_url", "follow_redirects",
    "enable_http2",
}
KUBERNETES_SD_ROLES = {"node", "service", "pod", "endpoints", "endpointslice", "ingress"}


def dropped_fields(original, round_trip, path=""):
    """Paths present in `original` but missing from `round_trip`."""
    if isinstance(original, dict) and isinstance(round_trip, dict):
        for key, value in original.items():
            here = f"{path}.{key}" if path else key
            if key not in round_trip:
                yield here
            else:
                yield from dropped_fields(value, round_trip[key], here)
    elif isinstance(original, list) and isinstance(round_trip, list):
        for index, (a, b) in enumerate(zip(original, round_trip)):
            yield from dropped_fields(a, b, f"{path}[{index}]")


def operator_resources(paths):
    failures = 0
    checked = 0
    for path in paths:
        with open(path) as file:
            documents = [d for d in yaml.safe_load_all(file) if d]
        for document in documents:
            if not document.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                continue
            name = f"{path}: {document.get('kind')}/{document.get('metadata', {}).get('name')}"
            model = OPERATOR_KINDS.get(document.get("kind"))
            if model is None or document["apiVersion"] != "monitoring.coreos.com/v1":
                print(f"ERROR {name}: no schema for {document['apiVersion']} {document.get('kind')}")
                failures += 1
                continue
            try:
                parsed = model.model_validate(document)
            except pydantic.ValidationError as error:
                print(f"ERROR {name}: {error}")
                failures += 1
                continue
            round_trip = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
            unknown = list(dropped_fields(document, round_trip))
            if unknown:
                print(f"ERROR {name}: unknown fields: {', '.join(unknown)}")
                failures += 1
                continue
            checked += 1
            print(f"INFO {name} passed against the prometheus-operator CRD schema")
    if checked == 0 and failures == 0:
        print("ERROR no prometheus-operator resource found")
        return 1
    return 1 if failures else 0


def scrape_config(source, destination):
    with open(source) as file:
        config = yaml.safe_load(file)
    failures = 0
    for job in config.get("scrape_configs", []):
        for sd in job.pop("kubernetes_sd_configs", []):
            unknown = set(sd) - KUBERNETES_SD_FIELDS
            role = sd.get("role")
            roles = [role] + [s.get("role") for s in sd.get("selectors", [])]
            if unknown or any(r not in KUBERNETES_SD_ROLES for r in roles):
                print(f"ERROR {source}: job {job.get('job_name')}: kubernetes_sd_configs "
                      f"has unknown fields {sorted(unknown)} or roles {roles}")
                failures += 1
            job.setdefault("static_configs", []).append({"targets": ["localhost:9977"]})
    with open(destination, "w") as file:
        yaml.safe_dump(config, file)
    return 1 if failures else 0


# The capabilities the daemon uses (deploy/systemd/observer.service explains each).
DAEMON_CAPABILITIES = {"BPF", "PERFMON", "SYS_RESOURCE", "DAC_READ_SEARCH", "SYS_ADMIN", "SYS_PTRACE"}


def load(path):
    with open(path) as file:
        return [d for d in yaml.safe_load_all(file) if d]


def the_container(daemonset):
    pod = daemonset["spec"]["template"]["spec"]
    containers = pod["containers"]
    if len(containers) != 1:
        raise SystemExit(f"ERROR expected one container, found {len(containers)}")
    return pod, containers[0]


def flag(container, name):
    """The value of --name=VALUE among the container's args, or None."""
    for arg in container.get("args", []):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def mount_source(pod, mount):
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume


def pod_policy(daemonset_path, servicemonitor_path, scrape_path):
    [daemonset] = load(daemonset_path)
    pod, container = the_container(daemonset)
    failures = []

    def require(condition, what):
        print(f"{'INFO' if condition else 'ERROR'} {what}")
        if not condition:
            failures.append(what)

    context = container.get("securityContext", {})
    capabilities = context.get("capabilities", {})
    require(context.get("privileged") is False, "not privileged")
    require(context.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    require(context.get("readOnlyRootFilesystem") is True, "a read-only root file system")
    require(context.get("seccompProfile", {}).get("type") == "RuntimeDefault",
            "the runtime's default seccomp profile")
    require(capabilities.get("drop") == ["ALL"], "capabilities: drop ALL")
    require(set(capabilities.get("add", [])) <= DAEMON_CAPABILITIES,
            f"capabilities added are the daemon's own ({sorted(DAEMON_CAPABILITIES)})")
    require(pod.get("automountServiceAccountToken") is False, "no service account token")

    listen = flag(container, "web.listen-address") or ""
    require(listen.startswith("$(NODE_IP):") or listen.startswith("[$(NODE_IP)]:"),
            "listens on the node's address only")
    config = flag(container, "web.config.file")
    config_mount = next((m for m in container.get("volumeMounts", [])
                         if config and config.startswith(m["mountPath"].rstrip("/") + "/")), None)
    require(config_mount is not None and "secret" in mount_source(pod, config_mount)
            and config_mount.get("readOnly") is True,
            "--web.config.file is read from a Secret mounted read-only")
    for kind in ("readinessProbe", "livenessProbe"):
        probe = container.get(kind, {}).get("httpGet", {})
        require(probe.get("scheme") == "HTTPS" and probe.get("path") == "/healthz",
                f"{kind}: HTTPS GET /healthz (the only path open without credentials)")

    for mount in container.get("volumeMounts", []):
        if "hostPath" in mount_source(pod, mount):
            require(mount.get("readOnly") is True, f"host path {mount['name']} mounted read-only")
    cgroupfs = flag(container, "path.cgroupfs")
    cgroup_mount = next((m for m in container.get("volumeMounts", [])
                         if m["mountPath"] == cgroupfs), None)
    require(cgroup_mount is not None and
            mount_source(pod, cgroup_mount).get("hostPath", {}).get("path") == "/sys/fs/cgroup",
            "--path.cgroupfs is the host's /sys/fs/cgroup")

    for monitor in load(servicemonitor_path):
        for endpoint in monitor["spec"]["endpoints"]:
            require(endpoint.get("scheme") == "https" and "basicAuth" in endpoint
                    and "ca" in endpoint.get("tlsConfig", {}),
                    "ServiceMonitor scrapes over HTTPS with basic auth, verifying the CA")
    [scrape] = load(scrape_path)
    for job in scrape["scrape_configs"]:
        require(job.get("scheme") == "https" and "basic_auth" in job
                and "ca_file" in job.get("tls_config", {}),
                f"scrape job {job['job_name']} uses HTTPS with basic auth, verifying the CA")
    return 1 if failures else 0


def pod_run(daemonset_path):
    [daemonset] = load(daemonset_path)
    pod, container = the_container(daemonset)
    context = container.get("securityContext", {})
    mounts = []
    for mount in container.get("volumeMounts", []):
        volume = mount_source(pod, mount)
        source = ({"host_path": volume["hostPath"]["path"]} if "hostPath" in volume
                  else {"secret": volume["secret"]["secretName"]} if "secret" in volume
                  else None)
        if source is None:
            raise SystemExit(f"ERROR volume {volume['name']}: neither hostPath nor secret")
        mounts.append({**source, "target": mount["mountPath"],
                       "read_only": mount.get("readOnly", False)})
    print(json.dumps({
        "host_pid": pod.get("hostPID", False),
        "host_network": pod.get("hostNetwork", False),
        "args": container.get("args", []),
        "env": [e["name"] for e in container.get("env", [])],
        "run_as_user": context.get("runAsUser"),
        "read_only_root": context.get("readOnlyRootFilesystem", False),
        "no_new_privileges": context.get("allowPrivilegeEscalation") is False,
        "cap_drop": context.get("capabilities", {}).get("drop", []),
        "cap_add": context.get("capabilities", {}).get("add", []),
        "mounts": mounts,
    }))
    return 0


def main(arguments):
    if arguments[:1] == ["operator-resources"] and len(arguments) > 1:
        return operator_resources(arguments[1:])
    if arguments[:1] == ["pod-policy"] and len(arguments) == 4:
        return pod_policy(*arguments[1:])
    if arguments[:1] == ["pod-run"] and len(arguments) == 2:
        return pod_run(arguments[1])
    if arguments[:1] == ["scrape-config"] and len(arguments) == 3:
        return scrape_config(arguments[1], arguments[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
