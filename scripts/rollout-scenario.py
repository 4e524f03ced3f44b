#!/usr/bin/env python3
"""Writes a simulator scenario of a five-wave rollout over SITES sites of
PER nodes each (docs/benchmarks.md, "Staged rollouts"):

    python3 scripts/rollout-scenario.py 100 20 > /tmp/r2000.toml
    ./target/release/shoal sim run /tmp/r2000.toml --out /dev/null

An anchor, every site linked to it (40-120 ms), the pretend runtime
(3 s to start), v1 applied at 5 s, v2 at 1 min through the waves: the
first site, then 1 %, 10 %, 50 % and 100 % of the nodes, 30 s gates.
"""
import sys

sites, per = int(sys.argv[1]), int(sys.argv[2])
duration = sys.argv[3] if len(sys.argv) > 3 else "10m"


def manifest(version):
    return f"""apiVersion: shoal.dev/v1
kind: App
metadata: {{name: meter}}
spec:
  version: {version}
  native: {{command: [/opt/meter, --{version}]}}
  rollout: {{waves: [{{sites: [s0]}}, {{percent: 1}}, {{percent: 10}}, {{percent: 50}}, {{percent: 100}}], healthy_for_s: 30}}
"""


groups = ['  { name = "anchor", count = 1, role = "anchor" },']
links = []
for i in range(sites):
    groups.append(f'  {{ name = "s{i}", count = {per}, site = "s{i}" }},')
    links.append(f'  {{ between = ["anchor", "s{i}"], latency = "{40 + (i % 5) * 20}ms" }},')
nl = "\n"
print(f'''name = "rollout-{sites}x{per}"
seed = 21
duration = "{duration}"
group = [
{nl.join(groups)}
]
link = [
{nl.join(links)}
]
runtime = {{ start = "3s" }}
event = [
  {{ at = "5s", apply = {{ on = "anchor", manifest = """
{manifest("v1")}""" }} }},
  {{ at = "1m", apply = {{ on = "anchor", manifest = """
{manifest("v2")}""" }} }},
]
expect = {{ converged_within = "5s", rollout = [{{ app = "meter", phase = "done", all_run = "v2", waves_open = 5 }}] }}''')
