"""Fashion-MNIST without a network: read the Debian package's idx files, or a packed ``.npz``.

    apt-get install -y dataset-fashion-mnist        # idx files under /usr/share/datasets/fashion-mnist
    python -m examples.fashion_mnist.data           # packs them into examples/fashion_mnist/data/fashion_mnist.npz

The ``.npz`` (uint8 images, ~30 MiB compressed) is what travels with a copied working tree to a
machine without the package; ``load`` reads whichever it finds first.
"""
from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKED = Path(__file__).parent / "data" / "fashion_mnist.npz"
SPLITS = {"train": "train", "test": "t10k"}
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
_IDX_MAGIC = {3: 2051, 1: 2049}  # images (3 dims), labels (1 dim), unsigned bytes


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte array (gzipped or not); ValueError naming the file if its header is not one."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    dims = raw[3]
    if dims not in _IDX_MAGIC or magic != _IDX_MAGIC[dims]:
        raise ValueError(f"{path}: not an idx-ubyte file (magic {magic:#x}); expected Fashion-MNIST's idx files")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, file holds {data.size} bytes")
    return data.reshape(shape)


def read_idx_dir(folder: Path) -> dict[str, np.ndarray]:
    """``{train_images, train_labels, test_images, test_labels}`` from the four idx files in ``folder``."""
    arrays = {}
    for split, prefix in SPLITS.items():
        for kind, dims in (("images", "idx3"), ("labels", "idx1")):
            candidates = [folder / f"{prefix}-{kind}-{dims}-ubyte{ext}" for ext in (".gz", "")]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise FileNotFoundError(f"{candidates[0]} (or without .gz) is missing")
            arrays[f"{split}_{kind}"] = read_idx(found)
    return arrays


def load(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The dataset as uint8 arrays: images [N, 28, 28], labels [N].

    Looks at ``path`` (an ``.npz`` or a folder of idx files), then ``$FASHION_MNIST``, then
    ``examples/fashion_mnist/data/fashion_mnist.npz``, then the Debian package's folder.
    """
    candidates = [Path(p) for p in (path, os.environ.get("FASHION_MNIST")) if p] + [PACKED, DEBIAN_DIR]
    for candidate in candidates:
        if candidate.is_file():
            with np.load(candidate) as packed:
                return {key: packed[key] for key in packed.files}
        if candidate.is_dir():
            return read_idx_dir(candidate)
        if candidate in candidates[: len(candidates) - 2]:
            raise FileNotFoundError(f"Fashion-MNIST: {candidate} is neither an .npz nor a folder of idx files")
    raise FileNotFoundError(
        f"Fashion-MNIST not found at {PACKED} or {DEBIAN_DIR}: `apt-get install -y dataset-fashion-mnist`, then "
        "`python -m examples.fashion_mnist.data` to pack it for a machine without the package"
    )


def pack(out: Path = PACKED, source: Path = DEBIAN_DIR) -> Path:
    """Write the idx files of ``source`` into one compressed ``.npz`` at ``out``."""
    arrays = read_idx_dir(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR)
    parser.add_argument("--out", type=Path, default=PACKED)
    args = parser.parse_args()
    out = pack(args.out, args.source)
    sizes = {key: value.shape for key, value in load(out).items()}
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB, {sizes}")


if __name__ == "__main__":
    main()
