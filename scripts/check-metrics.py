#!/usr/bin/env python3
"""Metric names: the source, the operator's guide, the rules and the dashboard
agree.

- Source: every `"name", "gauge|counter"` pair in relay/src/driver/metrics.rs,
  signaling/src/server/metrics.rs (rendered with the prefix
  wgice_signaling_) and ice-agent/src/metrics.rs (render_metrics).
- docs/operating.md must name each source metric in backquotes, and every
  backquoted relay_*/wgice_* name there must exist in the source.
- Every relay_*/wgice_* name used in the rules and the dashboard must exist.
- The dashboard is a Grafana dashboard: title, uid, panels with type, title
  and gridPos; every non-row panel has targets with a PromQL expr.

Usage: check-metrics.py REPO_ROOT
"""
import json
import pathlib
import re
import sys

root = pathlib.Path(sys.argv[1])
errors = []
pair = re.compile(r'"([a-z][a-z0-9_]*)",\s*"(gauge|counter|histogram|summary)"')
sources = {
    "relay/src/driver/metrics.rs": "",
    "signaling/src/server/metrics.rs": "wgice_signaling_",
    "ice-agent/src/metrics.rs": "",
}
metrics = {}
for path, prefix in sources.items():
    text = (root / path).read_text()
    if path.startswith("ice-agent/"):
        start = text.index("fn render_metrics")
        end = text.find("\nfn ", start + 1)
        end2 = text.find("\npub fn ", start + 1)
        text = text[start:min(e for e in (end, end2, len(text)) if e > 0)]
    found = {prefix + n: kind for n, kind in pair.findall(text)}
    if not found:
        errors.append(f"{path}: found no metric definitions (did the rendering code change shape?)")
    metrics.update(found)

name = re.compile(r"\b((?:relay|wgice)_[a-z0-9_]*[a-z0-9])\b")
docs = (root / "docs/operating.md").read_text()
for m in sorted(metrics):
    if f"`{m}`" not in docs:
        errors.append(f"docs/operating.md: metric `{m}` ({metrics[m]}) is not documented")
# Label values of wgice_dropped_total (e.g. `relay_unmatched`) are not names.
agent_rs = (root / "ice-agent/src/agent.rs").read_text()
by_reason = agent_rs[agent_rs.index("fn by_reason"):]
by_reason = by_reason[:by_reason.index("\n    }\n")]
reasons = set(re.findall(r'\("([a-z_]+)",', by_reason))
if "peer_limit" not in reasons:
    errors.append("ice-agent/src/agent.rs: could not read the drop reasons from fn by_reason")
for m in sorted(set(re.findall(r"`((?:relay|wgice)_[a-z0-9_]+)[`{]", docs))):
    if m not in metrics and m not in reasons:
        errors.append(f"docs/operating.md: `{m}` is not a metric any binary renders")

rules = (root / "deploy/monitoring/wgice-rules.yml").read_text()
exprs = [l.split("expr:", 1)[1] for l in rules.splitlines() if "expr:" in l]
if not exprs:
    errors.append("wgice-rules.yml: no expr lines")
for e in exprs:
    for m in name.findall(e):
        if m not in metrics:
            errors.append(f"wgice-rules.yml: `{m}` is not a metric any binary renders")

dash_path = root / "deploy/monitoring/wgice-dashboard.json"
try:
    dash = json.loads(dash_path.read_text())
except ValueError as e:
    errors.append(f"wgice-dashboard.json: not JSON: {e}")
    dash = {}
for key in ("title", "uid", "panels", "schemaVersion"):
    if key not in dash:
        errors.append(f"wgice-dashboard.json: no {key}")
ids = set()
queries = [v.get("definition", "") for v in dash.get("templating", {}).get("list", [])]
for p in dash.get("panels", []):
    for key in ("id", "type", "title", "gridPos"):
        if key not in p:
            errors.append(f"wgice-dashboard.json: panel {p.get('title', '?')} has no {key}")
    if p.get("id") in ids:
        errors.append(f"wgice-dashboard.json: duplicate panel id {p.get('id')}")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    targets = p.get("targets") or []
    if not targets or not all(t.get("expr") for t in targets):
        errors.append(f"wgice-dashboard.json: panel {p.get('title')} has a target without expr")
    queries += [t.get("expr", "") for t in targets]
used = set()
for q in queries:
    for m in name.findall(q):
        used.add(m)
        if m not in metrics:
            errors.append(f"wgice-dashboard.json: `{m}` is not a metric any binary renders")
for component in ("relay_", "wgice_signaling_", "wgice_peer_"):
    if not any(m.startswith(component) for m in used):
        errors.append(f"wgice-dashboard.json: no panel shows {component}* metrics")

for e in errors:
    print(f"check-metrics: {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"check-metrics: {len(metrics)} metrics in the source, all documented; "
      f"{len(exprs)} rule expressions and {len(queries)} dashboard queries use only those")
