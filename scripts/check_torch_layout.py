#!/usr/bin/env python3
"""Checks that a fedcompress model.safetensors follows PyTorch's layout.

Loads the file with safetensors' numpy API, checks every tensor name and shape against the
state dict of the PyTorch module below, then runs the forward pass with PyTorch's
conventions (y = x W^T + b, NCHW convolutions, flatten in C, H, W order) in numpy and
prints the test accuracy as JSON. With --torch, it also builds the real torch.nn module,
calls load_state_dict(strict=True) and evaluates it with torch.

    python3 scripts/check_torch_layout.py runs/latest/model.safetensors --data-dir DIR [--torch]

The PyTorch modules (use them to load a fedcompress model):

    mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(784, 200), relu1=nn.ReLU(),
                                    fc2=nn.Linear(200, 200), relu2=nn.ReLU(),
                                    fc3=nn.Linear(200, 10)))
    cnn: see CNN_SHAPES and torch_module() below.
"""

import argparse
import gzip
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import load_file

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel mean and std after scaling to [0, 1]

MLP_SHAPES = {
    "fc1.weight": (200, 784), "fc1.bias": (200,),
    "fc2.weight": (200, 200), "fc2.bias": (200,),
    "fc3.weight": (10, 200), "fc3.bias": (10,),
}
CNN_SHAPES = {
    "conv1.weight": (32, 1, 5, 5), "conv1.bias": (32,),
    "conv2.weight": (64, 32, 5, 5), "conv2.bias": (64,),
    "fc1.weight": (512, 3136), "fc1.bias": (512,),
    "fc2.weight": (10, 512), "fc2.bias": (10,),
}


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    dims = magic & 0xFF
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(data_dir, stem):
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    sys.exit(f"error: {stem}[.gz] not found in {data_dir}")


def conv2d(x, w, b):
    """NCHW convolution with padding 2 and stride 1, as nn.Conv2d(..., 5, padding=2)."""
    pad = w.shape[2] // 2
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    # windows: N, C, H, W, kh, kw -> N, H, W, (C kh kw)
    n, c, h, wd, kh, kw = windows.shape
    cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n, h, wd, c * kh * kw)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    return out.transpose(0, 3, 1, 2)


def max_pool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def forward(kind, t, images):
    x = ((images.astype(np.float32) / 255.0 - MEAN) / STD)
    relu = lambda v: np.maximum(v, 0)
    if kind == "mlp":
        x = x.reshape(len(x), -1)
        x = relu(x @ t["fc1.weight"].T + t["fc1.bias"])
        x = relu(x @ t["fc2.weight"].T + t["fc2.bias"])
        return x @ t["fc3.weight"].T + t["fc3.bias"]
    x = x.reshape(len(x), 1, 28, 28)
    x = max_pool(relu(conv2d(x, t["conv1.weight"], t["conv1.bias"])))
    x = max_pool(relu(conv2d(x, t["conv2.weight"], t["conv2.bias"])))
    x = x.reshape(len(x), -1)
    x = relu(x @ t["fc1.weight"].T + t["fc1.bias"])
    return x @ t["fc2.weight"].T + t["fc2.bias"]


def torch_module(kind):
    from collections import OrderedDict
    from torch import nn
    if kind == "mlp":
        return nn.Sequential(OrderedDict(
            fc1=nn.Linear(784, 200), relu1=nn.ReLU(), fc2=nn.Linear(200, 200),
            relu2=nn.ReLU(), fc3=nn.Linear(200, 10)))
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 32, 5, padding=2), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, 5, padding=2), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(), fc1=nn.Linear(3136, 512), relu3=nn.ReLU(),
        fc2=nn.Linear(512, 10)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model.safetensors written by fedcompress")
    parser.add_argument("--data-dir", required=True, help="directory of the t10k IDX files")
    parser.add_argument("--torch", action="store_true", help="also load into torch.nn and evaluate")
    args = parser.parse_args()

    tensors = load_file(args.model)
    kind = "cnn" if "conv1.weight" in tensors else "mlp"
    expected = CNN_SHAPES if kind == "cnn" else MLP_SHAPES
    if set(tensors) != set(expected):
        sys.exit(f"error: tensor names {sorted(tensors)} differ from PyTorch's {sorted(expected)}")
    for name, shape in expected.items():
        if tensors[name].shape != shape or tensors[name].dtype != np.float32:
            sys.exit(f"error: {name} is {tensors[name].dtype}{tensors[name].shape}, PyTorch expects float32{shape}")

    images = read_idx(find(args.data_dir, "t10k-images-idx3-ubyte"))
    labels = read_idx(find(args.data_dir, "t10k-labels-idx1-ubyte"))
    logits = np.concatenate([forward(kind, tensors, images[i:i + 500]) for i in range(0, len(images), 500)])
    result = {
        "kind": kind,
        "samples": int(len(labels)),
        "numpy_accuracy": float((logits.argmax(axis=1) == labels).mean()),
        "zeros": int(sum(int((t == 0).sum()) for t in tensors.values())),
    }
    if args.torch:
        import torch
        module = torch_module(kind)
        module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, strict=True)
        x = torch.from_numpy(((images.astype(np.float32) / 255.0 - MEAN) / STD).reshape(len(images), 1, 28, 28))
        if kind == "mlp":
            x = x.reshape(len(images), -1)
        with torch.no_grad():
            predicted = module(x).argmax(dim=1).numpy()
        result["torch_version"] = torch.__version__
        result["torch_accuracy"] = float((predicted == labels).mean())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
