"""The feature-extraction loop most tutorials write, run as its own script (a plain Python process,
with none of featcache's process settings):

    python -m benchmarks.tutorial SOURCE OUT.npz

SOURCE is an image folder with train/ and val/ (torchvision ImageFolder) or ``digits``. Transforms
in the main process, fp32, NCHW, batch 32, no workers; the classifier replaced by ``Identity``.
Writes ``{split}_X``, ``{split}_y`` and ``seconds`` (the loop alone, no imports or model loading).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder

from featcache import load_backbone
from featcache.sources import open_source

BACKBONE = "efficientnet_lite0"


class ArrayImages(torch.utils.data.Dataset):
    """uint8 arrays as PIL images through torchvision transforms."""

    def __init__(self, images, labels, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i]).convert("RGB")), int(self.labels[i])


def main(source: str, out: str) -> None:
    bb = load_backbone(BACKBONE)
    pp = bb.preprocess
    tf = T.Compose([T.Resize(pp.resize, interpolation=T.InterpolationMode(pp.interpolation)), T.CenterCrop(pp.crop),
                    T.ToTensor(), T.Normalize(pp.mean, pp.std)])
    model = bb.model.eval()
    model.classifier = torch.nn.Identity()  # what tutorials do to get pre-logit features
    if source == "digits":
        src = open_source("digits")
        datasets = {s: ArrayImages(np.stack([src.read(r)[0] for r in refs]), [r.label for r in refs], tf)
                    for s, refs in src.splits.items()}
    else:
        datasets = {s: ImageFolder(f"{source}/{s}", transform=tf) for s in ("train", "val")}
    result = {}
    t = time.perf_counter()
    for split, ds in datasets.items():
        loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=0)
        feats, labels = [], []
        with torch.no_grad():
            for x, y in loader:
                feats.append(model(x).numpy())
                labels.append(y.numpy())
        result[f"{split}_X"], result[f"{split}_y"] = np.concatenate(feats), np.concatenate(labels)
    result["seconds"] = np.float64(time.perf_counter() - t)
    np.savez(out, **result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
