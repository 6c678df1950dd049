"""Compare the running venv with the lock: exit 1 if any package differs (``--diff``: only report).

`make install` runs it so that a venv that drifted from the lock (a stale .venv, a pip that ignored a
constraint) fails loudly instead of testing a set nobody locked. Packages pinned in ``--optional FILE``
(requirements/peer.txt: llama.cpp, which `make peer` adds) may be absent, and must match their pin when present.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

IGNORED = {"pip", "setuptools", "wheel", "longreach"}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pins(path: str) -> dict[str, str]:
    found = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            found[canonical(name)] = version
    return found


def main(lock: str, report_only: bool, optional: str | None = None) -> int:
    locked = pins(lock)
    extra = pins(optional) if optional else {}
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    rows = []
    for name in sorted(set(locked) | set(installed) - IGNORED):
        want, got = locked.get(name, extra.get(name)), installed.get(name)
        if name in extra and name not in locked and got is None:
            continue
        if want != got:
            rows.append(f"  {name}: lock {want or '-'}, installed {got or '-'}")
    if not rows:
        print(f"installed set = {lock} ({len(locked)} packages)")
        return 0
    print(f"installed set differs from {lock}:\n" + "\n".join(rows))
    if report_only:
        return 0
    print("run `make clean install` (or `make lock` if pyproject.toml changed on purpose)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    args = sys.argv[2:]
    sys.exit(main(sys.argv[1], "--diff" in args, args[args.index("--optional") + 1] if "--optional" in args else None))
