"""Parses every PromQL expression of a Grafana dashboard with a real PromQL parser and prints,
as JSON, the metric names they use. Grafana's own variables are replaced first, as Grafana
does before it sends a query: ranges by a duration, label matchers by a regex.

Usage: promql.py DASHBOARD.json
"""
import json
import re
import sys

import promql_parser

SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "$job": ".*",
    "$instance": ".*",
}

dashboard = json.load(open(sys.argv[1]))
names = set()
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for variable, value in SUBSTITUTIONS.items():
            expr = expr.replace(variable, value)
        leftover = re.findall(r"\$\w+", expr)
        if leftover:
            sys.exit(f"panel {panel['title']!r}: unknown variable {leftover} in {target['expr']}")
        try:
            promql_parser.parse(expr)
        except Exception as e:  # the parser raises plain exceptions with its message
            sys.exit(f"panel {panel['title']!r}: {e}: {target['expr']}")
        names.update(re.findall(r"\b(ssegw_[a-z_]+)", expr))
json.dump(sorted(names), sys.stdout)
