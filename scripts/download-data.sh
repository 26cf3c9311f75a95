#!/usr/bin/env bash
# Downloads the four Fashion-MNIST files into DIR and checks their sizes and MD5 checksums.
#
# Usage: scripts/download-data.sh DIR
#
# Tries the Fashion-MNIST mirror on Amazon S3 first, then the files in Zalando's GitHub
# repository. Needs curl or wget. A file that is already present with the right size and
# checksum is kept. Afterwards, point fedcompress at the data with `--data-dir DIR` or
# `FEDCOMPRESS_DATA=DIR`.
#
# On Debian and Ubuntu, `apt-get install dataset-fashion-mnist` installs the same data under
# /usr/share/datasets/fashion-mnist, where fedcompress finds it without any flag.
set -euo pipefail

if [[ $# -ne 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    echo "usage: $0 DIR" >&2
    echo "downloads the Fashion-MNIST IDX files (about 30 MB) into DIR" >&2
    exit 2
fi
dir="$1"

mirrors=(
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion"
)

# Name, size in bytes and MD5 of each official file. The MD5 sums are the ones published in
# the Fashion-MNIST README. The sizes are those of the official gzip files, whose headers
# carry the original file name.
files=(
    "train-images-idx3-ubyte.gz 26421880 8d4fb7e6c68d591d4c3dfef9ec88bf0d"
    "train-labels-idx1-ubyte.gz 29515 25c81989df183df01b3e8a0aad5dffbe"
    "t10k-images-idx3-ubyte.gz 4422102 bef4ecab320f06d8554ea6380940ec79"
    "t10k-labels-idx1-ubyte.gz 5148 bb300cfdad3c16e7a12a480ee83cd310"
)

if command -v curl >/dev/null 2>&1; then
    fetch() { curl --fail --location --silent --show-error --retry 3 --output "$2" "$1"; }
elif command -v wget >/dev/null 2>&1; then
    fetch() { wget --quiet --tries=3 --output-document="$2" "$1"; }
else
    echo "error: neither curl nor wget is installed; install one of them and rerun" >&2
    exit 1
fi

# Prints the MD5 of a file, or nothing when no MD5 tool is installed.
md5_of() {
    if command -v md5sum >/dev/null 2>&1; then
        md5sum "$1" | cut -d ' ' -f 1
    elif command -v md5 >/dev/null 2>&1; then
        md5 -q "$1"
    fi
}

# Succeeds when the file exists with the expected size and, where an MD5 tool exists, checksum.
is_valid() {
    local path="$1" size="$2" md5="$3" actual_md5
    [[ -f "$path" ]] || return 1
    [[ "$(wc -c <"$path" | tr -d ' ')" == "$size" ]] || return 1
    actual_md5="$(md5_of "$path")"
    [[ -z "$actual_md5" || "$actual_md5" == "$md5" ]]
}

mkdir -p "$dir"

for entry in "${files[@]}"; do
    read -r name size md5 <<<"$entry"
    target="$dir/$name"

    if is_valid "$target" "$size" "$md5"; then
        echo "$name: already present"
        continue
    fi

    ok=0
    for mirror in "${mirrors[@]}"; do
        echo "$name: downloading from $mirror"
        if fetch "$mirror/$name" "$target.part" && is_valid "$target.part" "$size" "$md5"; then
            mv "$target.part" "$target"
            ok=1
            break
        fi
        echo "$name: failed to download a valid file from $mirror" >&2
        rm -f "$target.part"
    done

    if [[ "$ok" != 1 ]]; then
        echo "error: failed to download $name (expected $size bytes, MD5 $md5) from any mirror" >&2
        exit 1
    fi
done

echo "Fashion-MNIST is in $dir; use it with --data-dir $dir or FEDCOMPRESS_DATA=$dir"
