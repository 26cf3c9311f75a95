#!/usr/bin/env python3
"""Write the first N training and M test samples of Fashion-MNIST as gzip IDX files.

Usage: scripts/make-data-subset.py [SRC_DIR] [DEST_DIR] [TRAIN_COUNT] [TEST_COUNT]

SRC_DIR contains the four standard files (gzip or raw), by default the Debian/Ubuntu package
dataset-fashion-mnist at /usr/share/datasets/fashion-mnist. DEST_DIR defaults to
data/fashion-mnist-subset next to this script's repository, TRAIN_COUNT to 5000 and
TEST_COUNT to 1000. The output is byte-for-byte reproducible because the gzip headers carry
no file name and a zero timestamp. Only the Python standard library is used.
"""

import gzip
import os
import struct
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SRC = "/usr/share/datasets/fashion-mnist"
DEFAULT_DEST = os.path.join(REPO_ROOT, "data", "fashion-mnist-subset")

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


def read_idx(path, magic):
    """Read an IDX file (gzip or raw) and return its dimensions and data bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)

    ndims = magic & 0xFF
    header_len = 4 + 4 * ndims
    if len(raw) < header_len:
        sys.exit(f"{path}: truncated header ({len(raw)} bytes)")
    (found_magic,) = struct.unpack(">I", raw[:4])
    if found_magic != magic:
        sys.exit(f"{path}: magic number {found_magic:#010x}, expected {magic:#010x}")

    dims = struct.unpack(">" + "I" * ndims, raw[4:header_len])
    data = raw[header_len:]
    expected = 1
    for d in dims:
        expected *= d
    if len(data) != expected:
        sys.exit(f"{path}: {len(data)} data bytes, expected {expected} for dimensions {dims}")
    return dims, data


def write_idx_gz(path, magic, dims, data):
    """Write an IDX file with gzip compression and a reproducible gzip header."""
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * len(dims), *dims)
    with open(path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(header)
            gz.write(data)


def find_file(src, name):
    """Return the path of NAME.gz or NAME in SRC, whichever exists first."""
    for candidate in (name + ".gz", name):
        path = os.path.join(src, candidate)
        if os.path.exists(path):
            return path
    sys.exit(
        f"{name}(.gz) not found in {src}: install it with `apt-get install dataset-fashion-mnist` "
        f"or run `scripts/download-data.sh {src}`"
    )


def copy_prefix(src, dest, split, count):
    """Copy the first COUNT images and labels of SPLIT ("train" or "t10k") from SRC to DEST."""
    images_name = f"{split}-images-idx3-ubyte"
    labels_name = f"{split}-labels-idx1-ubyte"

    (n, rows, cols), images = read_idx(find_file(src, images_name), IMAGES_MAGIC)
    (n_labels,), labels = read_idx(find_file(src, labels_name), LABELS_MAGIC)
    if n != n_labels:
        sys.exit(f"{split}: {n} images but {n_labels} labels in {src}")
    if count > n:
        sys.exit(f"{split}: requested {count} samples but {src} has only {n}")

    write_idx_gz(
        os.path.join(dest, images_name + ".gz"),
        IMAGES_MAGIC,
        (count, rows, cols),
        images[: count * rows * cols],
    )
    write_idx_gz(os.path.join(dest, labels_name + ".gz"), LABELS_MAGIC, (count,), labels[:count])

    per_class = [0] * 10
    for label in labels[:count]:
        per_class[label] += 1
    print(f"{split}: wrote {count} of {n} samples ({rows}x{cols}), per class {per_class}")


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_SRC
    dest = sys.argv[2] if len(sys.argv) > 2 else DEFAULT_DEST
    train_count = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    test_count = int(sys.argv[4]) if len(sys.argv) > 4 else 1000

    os.makedirs(dest, exist_ok=True)
    copy_prefix(src, dest, "train", train_count)
    copy_prefix(src, dest, "t10k", test_count)


if __name__ == "__main__":
    main()
