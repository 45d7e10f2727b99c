#!/usr/bin/env bash
# The system packages edje needs beyond pip: Noto Color Emoji, the drawings of edje.data.emoji.
# Returns at once when the font is there; otherwise installs it with apt-get (as root).
set -euo pipefail
FONT=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
if [ -f "$FONT" ] || [ -f "${EDJE_EMOJI_FONT:-}" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: $FONT is missing and there is no apt-get; install Noto Color" \
    "Emoji with your package manager and set EDJE_EMOJI_FONT to its NotoColorEmoji.ttf" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_system_deps: $FONT is missing; as root run" \
    "'apt-get update && apt-get install -y fonts-noto-color-emoji'," \
    "or set EDJE_EMOJI_FONT to a NotoColorEmoji.ttf" >&2
  exit 1
fi
echo "install_system_deps: installing fonts-noto-color-emoji (the emoji data set's drawings)"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q fonts-noto-color-emoji
