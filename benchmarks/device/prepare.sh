#!/usr/bin/env bash
# Runs here (with network): downloads the wheels the GPU machine lacks (wheels.txt) for CPython
# 3.12 on manylinux x86_64 into benchmarks/device/wheels/ (git-ignored), then prints their total
# size and the size of everything that will travel (tracked and untracked-not-ignored files plus
# the wheels), which must stay under the 64 MiB the device call carries.
#   bash benchmarks/device/prepare.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest="$here/wheels"
budget=$((64 * 1024 * 1024))
mkdir -p "$dest"
mapfile -t pins < <(sed 's/#.*//; /^[[:space:]]*$/d' "$here/wheels.txt")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest" "${pins[@]}"
# one wheel per pin: stale versions from an older wheels.txt would make pip refuse the install there
for whl in "$dest"/*.whl; do
  base=$(basename "$whl")
  keep=0
  for pin in "${pins[@]}"; do
    name=$(echo "${pin%%==*}" | tr 'A-Z-' 'a-z_'); ver=${pin#*==}
    [[ $(echo "$base" | tr 'A-Z' 'a-z') == "${name}-${ver}-"* ]] && keep=1
  done
  [[ $keep == 1 ]] || { echo "removing stale $base"; rm -f "$whl"; }
done
wheels=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
tree=$(cd "$repo" && git ls-files -z --cached --others --exclude-standard \
  | xargs -0 du -cb 2>/dev/null | awk '/total$/ {s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
echo "wheels: $(ls "$dest"/*.whl | wc -l) files, $(mib "$wheels") MiB in $dest"
echo "travels with them: $(mib $((wheels + tree))) MiB of 64 MiB (working tree $(mib "$tree") MiB)"
if (( wheels + tree > budget )); then
  echo "over the 64 MiB carry budget" >&2
  exit 1
fi
