#!/usr/bin/env bash
# Re-take the pictures of the docs: run the main example; write its last epoch's figures, as the monitor drew
# them, to docs/figure-{ranking,correlation,profiles}.png (read back from the event file); then serve its logs
# with a real TensorBoard on localhost and screenshot the HISTOGRAMS and IMAGES pages into
# docs/tensorboard-histograms.png and docs/tensorboard-images.png with headless Chromium
# (Debian: apt-get install chromium; the figures need matplotlib, the `plots` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
rm -rf runs/oscillator
python examples/oscillator/train.py fit --config examples/oscillator/config.yaml
python - <<'PY'
import glob

from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

events = EventAccumulator(sorted(glob.glob("runs/oscillator/version_0/events.*"))[-1], size_guidance={IMAGES: 0})
events.Reload()
for name in ("ranking", "correlation", "profiles"):
    with open(f"docs/figure-{name}.png", "wb") as f:
        f.write(events.Images(f"sensitivity/{name}")[-1].encoded_image_string)
PY
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
