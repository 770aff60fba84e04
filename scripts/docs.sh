#!/usr/bin/env bash
# Build the documentation site on a fresh machine: set up .venv (torch first, then the package with its `docs`
# extra: MkDocs, Material, mkdocstrings), then `mkdocs build --strict` into site/ (SITE_DIR to change it).
# The pages under docs/ are the source; the API page comes from the docstrings, the changelog page is
# CHANGELOG.md. Offline: no web fonts, scripts or plugins that fetch anything. The build fails on a broken
# link, anchor or cross-reference, and on a public object without a docstring (docs/hooks/).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-docs} . scripts/setup-env.sh
SITE_DIR=${SITE_DIR:-site}
# NO_MKDOCS_2_WARNING: Material prints a banner about its future on every build; it is not about this site.
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$SITE_DIR"
echo "docs: the site is in $(cd "$SITE_DIR" && pwd): open $(cd "$SITE_DIR" && pwd)/index.html"
