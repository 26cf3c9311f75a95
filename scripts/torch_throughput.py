#!/usr/bin/env python3
"""Measure PyTorch's CPU training throughput on the fedcompress models, for comparison.

Usage: scripts/torch_throughput.py MODEL SAMPLES BATCH [--threads N] [--lr LR] [--data-dir DIR]

Trains one epoch of MODEL (mlp or cnn) on the first SAMPLES Fashion-MNIST training images with
SGD (momentum 0.9, no dampening, learning rate LR, default 0.05) and mini-batches of BATCH,
then prints the samples per second and the test accuracy. The arguments are in the order of
the Rust example `cargo run -p fedcompress-model --example throughput -- MODEL SAMPLES BATCH`.

The layer sizes and the pixel standardization are those of crates/model. As in the Rust
example, the samples are shuffled once per epoch, here with torch's generator, so the order
differs. The timed part is the epoch loop, including the gather of each mini-batch from the
standardized training tensor, as the Rust example times `train_local` including its batch
construction. Parameter initialization is PyTorch's own, which changes the loss but not the
speed.

The data directory is --data-dir, else FEDCOMPRESS_DATA, else /usr/share/datasets/fashion-mnist
(Debian/Ubuntu package dataset-fashion-mnist). Unlike the CLI, the script does not fall back to
the subset in the repository. It needs torch and numpy, for example in a virtual environment
outside the repository:

    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.9.0 numpy
"""

import argparse
import gzip
import os
import sys
import time

import numpy as np
import torch
from torch import nn

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "FEDCOMPRESS_DATA"

# Training-set mean and standard deviation of Fashion-MNIST pixels scaled to [0, 1], as in
# crates/model.
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte), number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

MOMENTUM = 0.9
EVAL_BATCH = 500


def read_idx(path, magic):
    """Read a gzip or raw IDX file of unsigned bytes into a numpy array of its shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[0:4], "big")
    if found != magic:
        sys.exit(f"error: {path}: IDX magic {found:#010x}, expected {magic:#010x}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    expected = int(np.prod(dims))
    if data.size != expected:
        sys.exit(f"error: {path}: {data.size} data bytes, expected {expected} for shape {dims}")
    return data.reshape(dims)


def find_file(data_dir, stem):
    """Return the path of STEM.gz or STEM in DATA_DIR, or exit when neither exists."""
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    sys.exit(f"error: {stem}(.gz) not found in {data_dir}. Pass --data-dir or set {DATA_DIR_ENV}.")


def load_split(data_dir, prefix):
    """Load one split as standardized float images [n, 1, 28, 28] and int64 labels [n]."""
    images = read_idx(find_file(data_dir, f"{prefix}-images-idx3-ubyte"), IMAGES_MAGIC)
    labels = read_idx(find_file(data_dir, f"{prefix}-labels-idx1-ubyte"), LABELS_MAGIC)
    if len(images) != len(labels):
        sys.exit(f"error: {prefix}: {len(images)} images but {len(labels)} labels")
    pixels = (images.astype(np.float32) / 255.0 - PIXEL_MEAN) / PIXEL_STD
    return torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def build_model(name):
    """Build the PyTorch twin of a fedcompress model. Both models take [batch, 1, 28, 28]."""
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, 10),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(3136, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )
    sys.exit(f"error: invalid MODEL `{name}`: expected mlp or cnn")


def train_epoch(model, images, labels, batch_size, lr, seed):
    """Train one shuffled epoch and return the sample-weighted mean loss and the seconds taken."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, dampening=0.0)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    model.train()

    started = time.perf_counter()
    order = torch.randperm(len(labels), generator=generator)
    loss_sum = torch.zeros(())
    for batch in torch.split(order, batch_size):
        inputs = images.index_select(0, batch)
        targets = labels.index_select(0, batch)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(batch)
    mean_loss = loss_sum.item() / len(labels)
    return mean_loss, time.perf_counter() - started


@torch.no_grad()
def evaluate(model, images, labels):
    """Return the accuracy and the seconds taken on IMAGES in batches of EVAL_BATCH."""
    model.eval()
    started = time.perf_counter()
    correct = 0
    for start in range(0, len(labels), EVAL_BATCH):
        logits = model(images[start : start + EVAL_BATCH])
        correct += (logits.argmax(1) == labels[start : start + EVAL_BATCH]).sum().item()
    return correct / len(labels), time.perf_counter() - started


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["mlp", "cnn"], help="model to train")
    parser.add_argument("samples", type=int, help="number of training images, from the first")
    parser.add_argument("batch", type=int, help="mini-batch size, in samples")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="number of intra-op threads, set with torch.set_num_threads (default 2)",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the initialization and the shuffle (default 0)"
    )
    parser.add_argument(
        "--data-dir",
        help=f"directory of the IDX files (default ${DATA_DIR_ENV}, then {DEFAULT_DATA_DIR})",
    )
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"invalid BATCH {args.batch}: must be at least 1")
    if args.threads < 1:
        parser.error(f"invalid --threads {args.threads}: must be at least 1")
    return args


def main():
    args = parse_args()
    data_dir = args.data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_images, train_labels = load_split(data_dir, "train")
    test_images, test_labels = load_split(data_dir, "t10k")
    if not 1 <= args.samples <= len(train_labels):
        count = len(train_labels)
        sys.exit(f"error: invalid SAMPLES {args.samples}: the training set has {count} images")
    print(f"data: {data_dir} ({len(train_labels)} train, {len(test_labels)} test)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    model = build_model(args.model)
    mean_loss, train_seconds = train_epoch(
        model,
        train_images[: args.samples],
        train_labels[: args.samples],
        args.batch,
        args.lr,
        args.seed,
    )
    print(
        f"{args.model} on torch, batch {args.batch}: trained {args.samples} samples in "
        f"{train_seconds:.2f} s = {args.samples / train_seconds:.0f} samples/s, "
        f"loss {mean_loss:.4f}"
    )

    accuracy, eval_seconds = evaluate(model, test_images, test_labels)
    print(
        f"evaluated {len(test_labels)} test samples in {eval_seconds:.2f} s = "
        f"{len(test_labels) / eval_seconds:.0f} samples/s, accuracy {accuracy:.4f}"
    )


if __name__ == "__main__":
    main()
