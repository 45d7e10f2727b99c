#!/usr/bin/env bash
# The system packages edje needs beyond pip: Noto Color Emoji (the drawings of edje.data.emoji),
# npm (fetches the icon corpus's packages: edje data build icons) and, with --browser, Chromium
# (the search page's browser test, tests/serving/test_search_page.py).
# Returns at once when they are there; otherwise installs them with apt-get (as root).
set -euo pipefail
FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
missing=()
if [ ! -f "$FONT" ] && [ ! -f "${EDJE_EMOJI_FONT:-}" ]; then
  missing+=(fonts-noto-color-emoji)
fi
if ! command -v npm >/dev/null 2>&1; then
  missing+=(npm)
fi
if [ "${1:-}" = "--browser" ] && ! command -v chromium >/dev/null 2>&1 \
    && [ ! -x "${EDJE_CHROMIUM:-}" ]; then
  missing+=(chromium)
fi
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps: missing ${missing[*]}; as root run" \
    "'apt-get update && apt-get install -y ${missing[*]}', or point EDJE_EMOJI_FONT at a" \
    "NotoColorEmoji.ttf and EDJE_CHROMIUM at a Chromium binary" >&2
  exit 1
fi
echo "install_system_deps: installing ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
