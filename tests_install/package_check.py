"""Helpers of ``scripts/install-check.sh`` for the built distributions; standard library only (no torch).

    python tests_install/package_check.py export SRC DEST   # copy what a fresh clone of SRC would hold
    python tests_install/package_check.py inspect DIST SRC  # check the sdist and wheel in DIST against SRC

``export`` copies the files git tracks plus the untracked ones it does not ignore (the working tree as a fresh
clone would have it, uncommitted edits included), so that no stale ``build/`` or ``*.egg-info`` of the checkout
reaches the distributions. ``inspect`` checks that the wheel is pure Python, holds the package (every module of
SRC's ``lightning_sensitivity/``) with ``py.typed``, its metadata (name, version, ``torch>=2.3`` unpinned, the
``cli`` and ``plots`` extras) and nothing else: no tests, examples, benchmarks, docs or scripts; and that the
sdist holds what building and testing from it needs. Prints one line per check; exits non-zero if any failed.
"""

from __future__ import annotations

import email.parser
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

PACKAGE = "lightning_sensitivity"
DIST_NAME = "lightning-sensitivity"
# directories of the repository that are not part of the installed package
NOT_INSTALLED = ("tests", "tests_install", "tests_recipes", "examples", "benchmarks", "docs", "scripts", ".ci")
TEST_FILE = re.compile(r"(^|/)(test_[^/]*\.py|[^/]*_test\.py|conftest\.py)$")

results: list[tuple[bool, str]] = []


def check(ok: bool, what: str) -> None:
    results.append((ok, what))
    print(f"{'OK  ' if ok else 'FAIL'} {what}")


def export(src: Path, dest: Path) -> None:
    listed = subprocess.run(
        ["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    count = 0
    for raw in listed:
        name = raw.decode()
        path = src / name
        if not name or not path.is_file():  # deleted in the work tree, or a submodule
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target, follow_symlinks=False)
        count += 1
    print(f"package-check: copied {count} files of {src} (as a fresh clone would have them) to {dest}")


def source_version(src: Path) -> str:
    text = (src / PACKAGE / "__init__.py").read_text()
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if match is None:
        sys.exit(f"package-check: no __version__ = '...' in {src / PACKAGE / '__init__.py'}")
    return match.group(1)


def package_files(src: Path) -> set[str]:
    """The package's modules and ``py.typed`` in the source tree, as wheel paths."""
    files = {
        path.relative_to(src).as_posix()
        for path in (src / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")
    }
    return files


def inspect_wheel(wheel: Path, src: Path, version: str) -> None:
    print(f"wheel {wheel.name}:")
    check(wheel.name == f"{PACKAGE}-{version}-py3-none-any.whl", "a pure-Python wheel named with the version")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        dist_info = f"{PACKAGE}-{version}.dist-info"
        metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
        top_level = archive.read(f"{dist_info}/top_level.txt").decode().split()
    tops = sorted({PurePosixPath(name).parts[0] for name in names})
    check(tops == sorted([PACKAGE, dist_info]), f"only {PACKAGE}/ and {dist_info}/ at the top (found {tops})")
    check(top_level == [PACKAGE], f"top_level.txt names {PACKAGE} alone (found {top_level})")
    check(f"{PACKAGE}/py.typed" in names, f"{PACKAGE}/py.typed is in the wheel (PEP 561)")
    tests = [name for name in names if TEST_FILE.search(name) or "/tests/" in f"/{name}"]
    check(not tests, f"no test files (found {tests[:5]})")
    others = [name for name in names if PurePosixPath(name).parts[0] in NOT_INSTALLED]
    check(not others, f"no {', '.join(NOT_INSTALLED)} directories (found {others[:5]})")
    junk = [name for name in names if "__pycache__" in name or name.endswith((".pyc", ".pyo"))]
    check(not junk, f"no bytecode (found {junk[:5]})")
    in_wheel = {name for name in names if name.startswith(f"{PACKAGE}/")}
    expected = package_files(src)
    check(
        in_wheel == expected,
        f"the package's {len(expected)} files exactly "
        f"(missing {sorted(expected - in_wheel)}, extra {sorted(in_wheel - expected)})",
    )
    check(
        metadata["Name"] == DIST_NAME and metadata["Version"] == version,
        f"metadata: {metadata['Name']} {metadata['Version']}",
    )
    requires = metadata.get_all("Requires-Dist") or []
    torch = [r for r in requires if re.match(r"torch\b", r)]
    check(torch == ["torch>=2.3"], f"Requires-Dist torch>=2.3, not pinned (found {torch})")
    extras = set(metadata.get_all("Provides-Extra") or [])
    check({"cli", "plots"} <= extras, f"extras cli and plots are declared (found {sorted(extras)})")
    check(metadata["Requires-Python"] == ">=3.10", f"Requires-Python {metadata['Requires-Python']}")
    check(metadata["License-Expression"] == "Apache-2.0", f"License-Expression {metadata['License-Expression']}")
    licenses = [name for name in names if name.startswith(f"{dist_info}/licenses/")]
    check(bool(licenses), f"the license file is in dist-info (found {licenses})")


def inspect_sdist(sdist: Path, src: Path, version: str) -> None:
    print(f"sdist {sdist.name}:")
    root = f"{PACKAGE}-{version}"
    check(sdist.name == f"{root}.tar.gz", "named with the version")
    with tarfile.open(sdist) as archive:
        names = {member.name for member in archive.getmembers() if member.isfile()}
    check(all(name.startswith(f"{root}/") for name in names), f"everything under {root}/")
    relative = {name[len(root) + 1 :] for name in names}
    needed = {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO", f"{PACKAGE}/py.typed", "tests/conftest.py"}
    check(needed <= relative, f"holds {', '.join(sorted(needed))} (missing {sorted(needed - relative)})")
    missing = package_files(src) - relative
    check(not missing, f"holds every file of the package (missing {sorted(missing)})")
    tests = {path.relative_to(src).as_posix() for path in (src / "tests").rglob("*.py")}
    check(tests <= relative, f"holds the whole test suite, {len(tests)} files (missing {sorted(tests - relative)})")
    junk = sorted(
        name
        for name in relative
        if name.split("/")[0] in (".venv", ".venv-lowest", "runs", "site", "build", "dist", "lightning_logs")
        or "__pycache__" in name
        or name.endswith((".pyc", ".pyo"))
    )
    check(not junk, f"no environments, logs, builds or bytecode (found {junk[:5]})")


def inspect(dist: Path, src: Path) -> None:
    version = source_version(src)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    check(
        len(wheels) == 1 and len(sdists) == 1,
        f"one wheel and one sdist (found {[path.name for path in wheels + sdists]})",
    )
    if wheels:
        inspect_wheel(wheels[0], src, version)
    if sdists:
        inspect_sdist(sdists[0], src, version)
    failed = sum(not ok for ok, _ in results)
    print(f"package-check: {len(results) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("export", "inspect"):
        sys.exit(__doc__)
    {"export": export, "inspect": inspect}[sys.argv[1]](Path(sys.argv[2]).resolve(), Path(sys.argv[3]).resolve())
