"""Validates ServiceMonitor manifests against the Prometheus Operator's schema, strictly.

kubernetes-validate knows only Kubernetes' own kinds; a ServiceMonitor is a custom resource.
Its schema comes from the pydantic models of cloudcoil-models-prometheus-operator (generated
from the operator's CRDs), closed here so that an unknown field is an error, as it is for
`kubernetes-validate --strict`. Usage: servicemonitor.py FILE...; exit status 1 on any error.
"""

import sys

import jsonschema
import yaml
from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor


def closed(node):
    """Forbids properties a schema does not name, at every level."""
    if isinstance(node, dict):
        if "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            closed(value)
    elif isinstance(node, list):
        for value in node:
            closed(value)
    return node


def main(paths):
    schema = closed(ServiceMonitor.model_json_schema(by_alias=True, mode="validation"))
    validator = jsonschema.Draft202012Validator(schema)
    errors = 0
    checked = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc is None:
                    continue
                if doc.get("kind") != "ServiceMonitor":
                    print(f"{path}: not a ServiceMonitor: {doc.get('kind')}")
                    errors += 1
                    continue
                checked += 1
                for error in validator.iter_errors(doc):
                    print(f"{path}: {error.json_path}: {error.message}")
                    errors += 1
    if checked == 0:
        print("no ServiceMonitor given")
        errors += 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
