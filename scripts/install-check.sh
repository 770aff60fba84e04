#!/usr/bin/env bash
# A real install, as a user gets it: build the sdist and the wheel (python -m build, the wheel from the sdist)
# from a copy of the checkout as a fresh clone holds it; check their contents (tests_install/package_check.py:
# py.typed in the wheel, no tests, examples or benchmarks in it, the metadata); then, in a fresh virtual
# environment outside the checkout, install torch first (TORCH_SPEC, default torch==2.13.0), then
# "<wheel>[cli,plots]", and run tests_install/smoke.py from an empty directory (the seed's y = C * x, one epoch
# of a Trainer with the monitor, LightningCLI with it); then, in the same environment, replace the wheel by the
# install lines for a clone, `pip install "<clone>[cli,plots]"` and `pip install "lightning-sensitivity[cli,plots]
# @ git+file://localhost/<clone>"`, running the smoke test after each. About 1.5 to 2.5 minutes.
#   BUILD_VENV  the environment that runs `build` (default: .venv; created bare if missing, `build` added)
#   KEEP=1      keep the temporary directory (dists, environment, logs) and print where it is
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
BUILD_VENV=${BUILD_VENV:-.venv}
start=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/install-check.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then trap 'echo "install-check: kept $work"' EXIT; else trap 'rm -rf "$work"' EXIT; fi
# Every pip call below, the isolated build environment's included, is held to this torch: no range that would
# let pip fetch a newer (CUDA) build.
echo "$TORCH_SPEC" >"$work/constraints.txt"
export PIP_CONSTRAINT="$work/constraints.txt"
pip_quiet=(-q --disable-pip-version-check)
stages=0  # each stage that passed (a failure stops the script)

echo "install-check: building the sdist and the wheel"
if [ ! -x "$BUILD_VENV/bin/python" ]; then python3 -m venv "$BUILD_VENV"; fi
"$BUILD_VENV/bin/python" -m pip install "${pip_quiet[@]}" build
# two copies: one to build the dists from, one left untouched for the install line of a clone
"$BUILD_VENV/bin/python" tests_install/package_check.py export "$ROOT" "$work/src"
cp -a "$work/src" "$work/clone"
# isolated: the build environment gets pyproject.toml's build-system.requires (setuptools), nothing else
"$BUILD_VENV/bin/python" -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 ||
  { cat "$work/build.log"; exit 1; }
ls -l "$work/dist"
"$BUILD_VENV/bin/python" tests_install/package_check.py inspect "$work/dist" "$work/src"
stages=$((stages + 1))
wheel=$(ls "$work"/dist/*.whl)

echo "install-check: a fresh environment: $TORCH_SPEC, then $(basename "$wheel")[cli,plots]"
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install "${pip_quiet[@]}" "$TORCH_SPEC"
"$work/venv/bin/python" -m pip install "${pip_quiet[@]}" "$wheel[cli,plots]"
"$work/venv/bin/python" -m pip check
mkdir "$work/run"
cp tests_install/smoke.py "$work/run/"
# -I: no PYTHONPATH, no user site, no script directory on sys.path: the package can only come from the venv
(cd "$work/run" && "$work/venv/bin/python" -I smoke.py "$ROOT")
stages=$((stages + 1))

# The install lines of the README, in the same environment (its dependencies are the wheel's: the same metadata):
# from a clone's directory, and by a git URL (git+file://localhost/... stands in for git+https://...: no network
# here; it installs the clone's last commit).
installs=("$work/clone[cli,plots]")
if git -C "$ROOT" rev-parse --verify -q HEAD >/dev/null; then
  installs+=("lightning-sensitivity[cli,plots] @ git+file://localhost$ROOT")
fi
for requirement in "${installs[@]}"; do
  echo "install-check: the same environment, the package replaced by pip install \"$requirement\""
  "$work/venv/bin/python" -m pip uninstall "${pip_quiet[@]}" -y lightning-sensitivity
  "$work/venv/bin/python" -m pip install "${pip_quiet[@]}" "$requirement"
  (cd "$work/run" && "$work/venv/bin/python" -I smoke.py "$ROOT")
  stages=$((stages + 1))
done
removing=$SECONDS
if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; fi  # about 1 GiB, mostly torch: tens of seconds on this disk
echo "install-check: done in $((SECONDS - start)) s ($((SECONDS - removing)) s of it removing the temporary" \
  "directory): the dists' contents, then the wheel and ${#installs[@]} install lines"
echo "install-check: $stages passed, 0 failed"
