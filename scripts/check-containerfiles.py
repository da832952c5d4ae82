#!/usr/bin/env python3
"""Structural checks of deploy/containers/Containerfile.* (no container engine
here, and hadolint is not packaged for Debian). Parses each file with
dockerfile-parse (PyPI) and checks what our images rely on:

- every instruction parses; a rust:* build stage and a debian:bookworm-slim
  final stage; COPY --from names a stage defined above it;
- `cargo build --locked -p CRATE --bin BIN` names a workspace member and a
  binary of it, and the final stage copies that binary to the ENTRYPOINT path;
- ENTRYPOINT in exec (JSON) form;
- apt-get install with --no-install-recommends, and the apt lists removed in
  the same RUN;
- relay and signaling end as a numeric non-root USER; the agent image
  installs wireguard-tools.

Usage: check-containerfiles.py REPO_ROOT
"""
import json
import pathlib
import re
import sys

from dockerfile_parse import DockerfileParser

root = pathlib.Path(sys.argv[1])
members = re.search(r'members\s*=\s*\[([^\]]*)\]', (root / "Cargo.toml").read_text()).group(1)
members = re.findall(r'"([^"]+)"', members)
errors = []


def check(path: pathlib.Path) -> None:
    role = path.name.split(".", 1)[1]
    err = lambda msg: errors.append(f"{path.relative_to(root)}: {msg}")
    p = DockerfileParser(fileobj=open(path, "rb"))
    ins = p.structure
    known = {"COMMENT", "FROM", "RUN", "COPY", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "ENV", "ARG", "LABEL"}
    for i in ins:
        if i["instruction"] not in known:
            err(f"line {i['startline'] + 1}: unexpected instruction {i['instruction']}")
    stages, froms = [], [i for i in ins if i["instruction"] == "FROM"]
    if len(froms) < 2:
        err("needs a build stage and a runtime stage (multi-stage)")
        return
    if not re.match(r"(docker\.io/library/)?rust:\S+", froms[0]["value"]):
        err(f"build stage is {froms[0]['value']!r}, expected a rust:<version> image")
    if not re.match(r"(docker\.io/library/)?debian:bookworm-slim$", froms[-1]["value"]):
        err(f"runtime stage is {froms[-1]['value']!r}, expected debian:bookworm-slim")
    final_start = froms[-1]["startline"]
    built = {}
    for i in ins:
        v = i["value"]
        if i["instruction"] == "FROM":
            m = re.search(r"\s+AS\s+(\S+)$", v, re.I)
            if m:
                stages.append(m.group(1))
        if i["instruction"] == "COPY":
            m = re.search(r"--from=(\S+)", v)
            if m and m.group(1) not in stages:
                err(f"line {i['startline'] + 1}: COPY --from={m.group(1)}: no such stage above")
        if i["instruction"] == "RUN":
            for m in re.finditer(r"cargo build\b([^&;]*)", v):
                args = m.group(1)
                if "--locked" not in args:
                    err(f"line {i['startline'] + 1}: cargo build without --locked")
                crate = re.search(r"-p\s+(\S+)", args)
                binary = re.search(r"--bin\s+(\S+)", args)
                if not crate or crate.group(1) not in members:
                    err(f"line {i['startline'] + 1}: cargo build -p must name a workspace member {members}")
                elif binary:
                    manifest = (root / crate.group(1) / "Cargo.toml").read_text()
                    name = re.search(r'^name\s*=\s*"([^"]+)"', manifest, re.M).group(1)
                    bins = {name} | set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', manifest))
                    bins |= {f.stem for f in (root / crate.group(1) / "src/bin").glob("*.rs")}
                    if binary.group(1) not in bins:
                        err(f"line {i['startline'] + 1}: crate {crate.group(1)} has no binary {binary.group(1)}")
                    built[binary.group(1)] = True
            if "apt-get install" in v:
                if "--no-install-recommends" not in v:
                    err(f"line {i['startline'] + 1}: apt-get install without --no-install-recommends")
                if "rm -rf /var/lib/apt/lists" not in v:
                    err(f"line {i['startline'] + 1}: apt lists not removed in the same RUN")
    entry = [i for i in ins if i["instruction"] == "ENTRYPOINT"]
    if not entry:
        err("no ENTRYPOINT")
    else:
        try:
            argv = json.loads(entry[-1]["value"])
        except ValueError:
            err("ENTRYPOINT must be in exec (JSON) form")
            argv = []
        if argv and pathlib.PurePath(argv[0]).name not in built:
            err(f"ENTRYPOINT {argv[0]} is not a binary built by cargo build above")
        copies = [i["value"] for i in ins if i["instruction"] == "COPY" and i["startline"] > final_start]
        if argv and not any(c.split()[-1] == argv[0] for c in copies):
            err(f"the runtime stage copies nothing to {argv[0]}")
    users = [i["value"].strip() for i in ins if i["instruction"] == "USER" and i["startline"] > final_start]
    if role in ("relay", "signaling"):
        if not users or not re.match(r"^[1-9][0-9]*(:[1-9][0-9]*)?$", users[-1]):
            err("must end as a numeric non-root USER (uid:gid)")
    if role == "ice-agent":
        installs = " ".join(i["value"] for i in ins if i["instruction"] == "RUN" and i["startline"] > final_start)
        if "wireguard-tools" not in installs:
            err("the agent image must install wireguard-tools")


files = sorted((root / "deploy/containers").glob("Containerfile.*"))
expected = {"relay", "signaling", "ice-agent"}
found = {f.name.split(".", 1)[1] for f in files}
if found != expected:
    errors.append(f"deploy/containers: expected Containerfile.{{{','.join(sorted(expected))}}}, found {sorted(found)}")
for f in files:
    check(f)
for e in errors:
    print(f"check-containerfiles: {e}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"check-containerfiles: {len(files)} Containerfiles pass")
