#!/usr/bin/env bash
# Re-take docs/tensorboard-histograms.png and docs/tensorboard-images.png: run the main example, serve its logs
# with a real TensorBoard on localhost, and screenshot the HISTOGRAMS and IMAGES pages with headless Chromium
# (Debian: apt-get install chromium; the figures need matplotlib, the `plots` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
rm -rf runs/oscillator
python examples/oscillator/train.py fit --config examples/oscillator/config.yaml
tensorboard --logdir runs/oscillator --host 127.0.0.1 --port 6006 >/tmp/tensorboard.log 2>&1 &
tb=$!
trap 'kill $tb' EXIT
sleep 8
shoot() {  # shoot <file> <tab> <height>
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size="1400,$3" \
    --virtual-time-budget=20000 --screenshot="$1" "http://127.0.0.1:6006/?darkMode=false#$2"
}
shoot docs/tensorboard-histograms.png histograms 700
shoot docs/tensorboard-images.png images 1100
