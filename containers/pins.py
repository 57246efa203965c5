"""Checks that containers/constraints-gpu.txt pins everything the GPU image adds and replaces nothing it is built on.

The same rules hold in two places, so one script serves both:
  * CI (containers/check.sh): "base" is a resolution of the base image's own package (sglang) and "full" a
    resolution of this package's `gpu` extra, both under the constraints, both for the image's Python and platform.
  * the image build (containers/Dockerfile): "base" is a snapshot of the base image's Python packages taken before
    anything is installed, "full" a snapshot taken after.

Rules (each broken one is reported as one line):
  1. every pin that the full set contains is honoured (a local label such as torch's +cu130 matches a bare pin);
  2. every name==version pin is in the full set (a stale pin hides a forgotten dependency change);
  3. every package the full set adds to the base is pinned, so the image is reproducible;
  4. no package of the base changes version or build, pinned or not: the base image's torch is what SGLang, apex and
     Transformer Engine are built against, and pip replacing it is the failure this file exists to prevent.

  python containers/pins.py snapshot OUT.txt
  python containers/pins.py check --constraints containers/constraints-gpu.txt --base BASE.txt --full FULL.txt

Runs on the standard library plus `packaging` (present wherever pip's dependencies are: the CI venv and the image).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

PROJECT = "megatron-zero"  # the package being installed is not a dependency of itself


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_listing(text: str, source: str) -> dict[str, str]:
    """`name==version` or `name @ url` lines (requirements syntax, comments allowed) -> {name: version or url}."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as error:
            raise ValueError(f"{source}:{number}: {line!r} is not a requirement line ({error})") from None
        specifiers = list(requirement.specifier)
        if requirement.url:
            entries[normalize(requirement.name)] = requirement.url
        elif len(specifiers) == 1 and specifiers[0].operator == "==":
            entries[normalize(requirement.name)] = specifiers[0].version
        else:
            raise ValueError(f"{source}:{number}: {line!r} is not an exact pin; write name==version or name @ url")
    return entries


def is_url(value: str) -> bool:
    return "://" in value


def same_version(left: str, right: str) -> bool:
    if is_url(left) or is_url(right):
        return left == right
    return Version(left) == Version(right)


def honours(value: str, pin: str) -> bool:
    if is_url(pin) or is_url(value):
        return value == pin
    return SpecifierSet(f"=={pin}").contains(Version(value), prereleases=True)


def problems(pins: dict[str, str], base: dict[str, str], full: dict[str, str], *, ignore_url_pins: bool = False,
             allow_missing: bool = False) -> list[str]:
    found = []
    for name, pin in sorted(pins.items()):
        if name in full:
            if not honours(full[name], pin):
                found.append(f"pin not honoured: {name} is {full[name]}, the constraints say {pin}")
        elif not allow_missing and not (ignore_url_pins and is_url(pin)):
            found.append(f"stale pin: {name} ({pin}) is not in the installed set; drop it or require it")
    for name, value in sorted(full.items()):
        if name == PROJECT:
            continue
        if name not in base and name not in pins:
            found.append(f"unpinned addition: {name} {value}; add `{name}=={value}` to the constraints")
        elif name in base and not same_version(base[name], value):
            found.append(f"base package replaced: {name} {base[name]} -> {value}; pin what the base image has")
    return found


def installed_listing() -> str:
    """This interpreter's distributions as requirement lines; git installs keep their commit (apex's version,
    0.1, says nothing)."""
    lines = {}
    for distribution in importlib.metadata.distributions():
        name = normalize(distribution.metadata["Name"])
        direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
        vcs = direct_url.get("vcs_info", {})
        if vcs.get("vcs") == "git":
            lines[name] = f"{name} @ git+{direct_url['url']}@{vcs['commit_id']}"
        else:
            lines[name] = f"{name}=={distribution.version}"
    return "".join(f"{lines[name]}\n" for name in sorted(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    snapshot = commands.add_parser("snapshot", help="write this Python's installed packages as pins")
    snapshot.add_argument("out", type=Path)
    check = commands.add_parser("check", help="apply the four rules")
    check.add_argument("--constraints", type=Path, required=True)
    check.add_argument("--base", type=Path, required=True)
    check.add_argument("--full", type=Path, required=True)
    check.add_argument("--ignore-url-pins", action="store_true",
                       help="a resolution cannot contain git pins (apex) that nothing in it requires")
    check.add_argument("--allow-missing", action="store_true",
                       help="check only the pins present (the base image before anything is added)")
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        args.out.write_text(installed_listing())
        return 0
    listings = [parse_listing(path.read_text(), str(path)) for path in (args.constraints, args.base, args.full)]
    found = problems(*listings, ignore_url_pins=args.ignore_url_pins, allow_missing=args.allow_missing)
    for line in found:
        print(line, file=sys.stderr)
    print(f"{args.constraints}: {len(listings[0])} pins, {len(listings[2])} packages, "
          f"{len(found)} problem(s)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
