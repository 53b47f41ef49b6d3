#!/usr/bin/env bash
# Download the wheels listed in bench/device_wheels.txt into .whl/ and .whl_extra/ (both git-ignored) for the
# device machine's Python 3.12 (see ../.library/device/README.md on carrying wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=""
while read -r line; do
  line=${line%%#*}; line=$(echo "$line" | xargs)
  [ -z "$line" ] && continue
  case $line in "[.whl]") dest=.whl; continue ;; "[.whl_extra]") dest=.whl_extra; continue ;; esac
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$line"
done < bench/device_wheels.txt
mkdir -p .git/info; touch .git/info/exclude
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
grep -qx '/.whl_extra/' .git/info/exclude || echo /.whl_extra/ >> .git/info/exclude
