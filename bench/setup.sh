#!/usr/bin/env bash
# Installs everything the side-by-side benchmark needs, idempotently:
#   - Debian packages: nginx with the image_filter module, wrk, serf;
#   - thumbor 7.8 (with pycurl) in its own venv, bench/.work/thumbor-venv;
#   - matplotlib and psutil for the harness, in bench/.work/venv;
#   - the photo corpus from Debian's plasma-workspace-wallpapers, in bench/.work/corpus.
# Re-running it skips whatever is already there. Nothing under bench/.work is committed.
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$BENCH")"
WORK="$BENCH/.work"
PYTHON="${PYTHON:-python3}"
THUMBOR_VERSION="${THUMBOR_VERSION:-7.8.0}"
mkdir -p "$WORK"

"$ROOT/scripts/ensure-debs" nginx libnginx-mod-http-image-filter wrk serf

# thumbor: one venv of its own, with the same python3 as the project.
TV="$WORK/thumbor-venv"
if ! "$TV/bin/python" -c "import thumbor, sys; sys.exit(thumbor.__version__ != '$THUMBOR_VERSION')" 2>/dev/null; then
    rm -rf "$TV"
    "$PYTHON" -m venv "$TV" || { "$ROOT/scripts/ensure-debs" python3-venv && rm -rf "$TV" &&
                                 "$PYTHON" -m venv "$TV"; }
    "$TV/bin/pip" install -q --upgrade pip
    "$TV/bin/pip" install -q "thumbor==$THUMBOR_VERSION"
fi
# thumbor advises pycurl for its HTTP loader; PyPI has wheels, and without one it builds
# from source against libcurl's headers.
if ! "$TV/bin/python" -c "import pycurl" 2>/dev/null; then
    if ! "$TV/bin/pip" install -q --only-binary=:all: pycurl; then
        "$ROOT/scripts/ensure-debs" libcurl4-openssl-dev libssl-dev python3-dev gcc
        "$TV/bin/pip" install -q pycurl
    fi
fi

# The harness's own venv: plots, process sampling, and py-spy for --profile.
BV="$WORK/venv"
if ! "$BV/bin/python" -c "import matplotlib, psutil, PIL" 2>/dev/null || [ ! -x "$BV/bin/py-spy" ]; then
    [ -x "$BV/bin/python" ] || "$PYTHON" -m venv "$BV"
    "$BV/bin/pip" install -q --upgrade pip
    "$BV/bin/pip" install -q matplotlib psutil pillow py-spy
fi

# The corpus: real photos from Debian, plus a WebP and an animated GIF made from them.
if [ ! -f "$WORK/corpus/corpus.json" ]; then
    if ! ls "$WORK"/plasma-workspace-wallpapers_*.deb >/dev/null 2>&1; then
        (cd "$WORK" && apt-get download plasma-workspace-wallpapers 2>/dev/null) || {
            apt-get update -qq && (cd "$WORK" && apt-get download plasma-workspace-wallpapers)
        }
    fi
    rm -rf "$WORK/wallpapers"
    dpkg -x "$(ls "$WORK"/plasma-workspace-wallpapers_*.deb | head -1)" "$WORK/wallpapers"
    "$BV/bin/python" "$BENCH/corpus.py" "$WORK/wallpapers" "$WORK/corpus"
fi
echo "bench setup: ready ($WORK)"
