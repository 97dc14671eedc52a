"""Prunes a Debian-based root file system to what aiwfe's runtime uses (deploy/Dockerfile's
`rootfs` stage; the final image is built FROM scratch on what is left).

Kept: the Debian packages the running interpreter, its standard library's extension modules
and the virtualenv's extension modules link against (found with ldd, so it works for
Debian's python3 in /usr and for an official Python image's /usr/local alike), the packages
named on the command line when installed (e.g. dash for the HEALTHCHECK's `sh`, tzdata for
schedules' time zones), and everything those depend on. Files no package owns (/usr/local,
/etc/passwd, the virtualenv...) are never touched. Every other package's files are removed
and the package is removed from dpkg's status file too, so the database (what image scanners
read) lists exactly what is there.

Usage: python3 slim-rootfs.py --scan DIR [--scan DIR ...] PACKAGE ...
Prints the kept packages; fails when a scanned file needs a library it cannot find.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

DPKG = Path("/var/lib/dpkg")


def stanzas() -> list[dict[str, str]]:
    out = []
    for block in (DPKG / "status").read_text().split("\n\n"):
        if not block.strip():
            continue
        fields: dict[str, str] = {}
        key = ""
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line
            else:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        fields["_raw"] = block.strip("\n")
        out.append(fields)
    return out


def file_lists(name: str, arch: str) -> list[Path]:
    return [
        p
        for p in (DPKG / "info" / f"{name}:{arch}.list", DPKG / "info" / f"{name}.list")
        if p.exists()
    ]


def canonical(path: str) -> str:
    """One name per file whatever the /usr merge: the real directory plus the base name."""
    head, tail = os.path.split(path)
    return os.path.join(os.path.realpath(head or "/"), tail)


def elf_files(roots: list[str]) -> list[str]:
    found = []
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                with open(path, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        found.append(path)
    return found


def needed_libraries(files: list[str]) -> dict[str, set[str]]:
    libs: dict[str, set[str]] = {}
    for path in files:
        libs[path] = set()
        result = subprocess.run(["ldd", path], capture_output=True, text=True)
        if result.returncode != 0:  # static or not a dynamic object: nothing to keep
            continue
        for line in result.stdout.splitlines():
            if "not found" in line:
                sys.exit(f"slim-rootfs: {path} needs a missing library: {line.strip()}")
            m = re.search(r"(/\S+)", line)
            if m:
                libs[path].add(m.group(1))
    return libs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scan", action="append", default=[])
    parser.add_argument("--without", action="append", default=[])
    parser.add_argument("packages", nargs="*")
    args = parser.parse_args()

    entries = [s for s in stanzas() if s.get("Status", "").endswith(" installed")]
    by_name = {s["Package"]: s for s in entries}
    providers: dict[str, list[str]] = {}
    for s in entries:
        for provided in s.get("Provides", "").split(","):
            if provided.strip():
                providers.setdefault(provided.split()[0], []).append(s["Package"])
    owner: dict[str, set[str]] = {}
    for s in entries:
        for lst in file_lists(s["Package"], s.get("Architecture", "")):
            for line in lst.read_text().splitlines():
                owner.setdefault(canonical(line), set()).add(s["Package"])

    # The interpreter itself and the libraries everything loaded at run time links against.
    stdlib = sysconfig.get_paths()["stdlib"]
    dynload = os.path.join(sysconfig.get_paths()["platstdlib"], "lib-dynload")
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    executable = os.path.realpath(sys.executable)
    scanned = [executable, *elf_files([dynload, *args.scan])]
    scanned += [str(p) for p in Path(libdir).glob("libpython3*.so*") if p.is_file()]
    without = set(args.without)

    def owners(path: str) -> set[str]:
        return owner.get(canonical(path), set()) | owner.get(
            canonical(os.path.realpath(path)), set()
        )

    roots = set(args.packages) & set(by_name)
    unlinked = []  # standard-library modules whose libraries are left out go with them
    for path, libs in needed_libraries(scanned).items():
        missing = {p for lib in libs for p in owners(lib) if p in without}
        if missing and os.path.dirname(path) == dynload:
            unlinked.append(path)
        elif missing:
            sys.exit(f"slim-rootfs: {path} needs {sorted(missing)}, which --without leaves out")
        else:
            roots |= {p for lib in {path, *libs} for p in owners(lib)}
    for path in (sys.executable, "/usr/bin/python3"):
        roots |= owners(path)
    for dirpath, _dirs, files in os.walk(stdlib):  # a Debian python's stdlib packages
        for name in files:
            roots |= owners(os.path.join(dirpath, name))
    roots -= without
    for path in unlinked:
        os.unlink(path)

    keep: set[str] = set()
    todo = sorted(roots)
    while todo:
        name = todo.pop()
        if name in keep or name not in by_name or name in without:
            continue
        keep.add(name)
        s = by_name[name]
        for field in ("Pre-Depends", "Depends"):
            for clause in filter(None, (c.strip() for c in s.get(field, "").split(","))):
                options = [re.split(r"[\s:(]", alt.strip())[0] for alt in clause.split("|")]
                installed = [o for o in options if o in by_name] or [
                    p for o in options for p in providers.get(o, [])
                ]
                todo.extend(installed[:1])

    kept_files = {path for path, pkgs in owner.items() if pkgs & keep}
    removed = 0
    for s in entries:
        if s["Package"] in keep:
            continue
        for lst in file_lists(s["Package"], s.get("Architecture", "")):
            for line in lst.read_text().splitlines():
                path = canonical(line)
                if path in kept_files or not os.path.lexists(path) or os.path.isdir(path):
                    continue
                os.unlink(path)
                removed += 1
        names = {s["Package"], f"{s['Package']}:{s.get('Architecture', '')}"}
        for path in (DPKG / "info").iterdir():
            if path.name.rpartition(".")[0] in names:
                path.unlink()
    (DPKG / "status").write_text(
        "\n\n".join(s["_raw"] for s in stanzas() if s.get("Package") in keep) + "\n"
    )
    for stale in ("status-old", "available", "available-old", "diversions-old"):
        (DPKG / stale).unlink(missing_ok=True)
    print(
        f"slim-rootfs: kept {len(keep)} packages, removed {len(entries) - len(keep)} "
        f"({removed} files): {' '.join(sorted(keep))}"
    )
    if unlinked:
        names = " ".join(os.path.basename(p) for p in unlinked)
        print(f"slim-rootfs: removed with their libraries: {names}")


if __name__ == "__main__":
    main()
