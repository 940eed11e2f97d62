"""Checks of deploy/ that need Python packages; run by `cargo xtask test` with the venv
that xtask's bootstrap installs under target/ (see xtask/src/deploy.rs).

  operator-resources FILE...
      prometheus-operator resources (ServiceMonitor, ...) against the operator's CRD
      schema, as the cloudcoil models carry it. kubernetes-validate has no schema for
      custom resources. Models accept unknown fields, so a field the model drops on a
      round trip (a typo, a field of another version) is reported too.

  scrape-config IN OUT
      Debian's promtool is built without Kubernetes service discovery. Writes IN to OUT
      with each job's kubernetes_sd_configs (checked here against the fields Prometheus
      documents) replaced by a static target, so promtool can check everything else.
"""

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


def main(arguments):
    if arguments[:1] == ["operator-resources"] and len(arguments) > 1:
        return operator_resources(arguments[1:])
    if arguments[:1] == ["scrape-config"] and len(arguments) == 3:
        return scrape_config(arguments[1], arguments[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
