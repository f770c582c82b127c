"""``npy``: embedding-reader's ``parquet_npy`` layout (what clip-retrieval writes):
``SPLIT/embeddings/0000.npy`` (rows x dim) beside ``SPLIT/metadata/0000.parquet``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common.files import atomic_write
from .base import FORMATS, ExportFormat, Part, require


@FORMATS.register("npy", description="SPLIT/embeddings/NNNN.npy + SPLIT/metadata/NNNN.parquet (embedding-reader "
                                     "parquet_npy)")
class NpyFormat(ExportFormat):
    name = "npy"
    folders = ("embeddings", "metadata")

    def files(self, split_dir: Path, part: str) -> list[Path]:
        return [split_dir / "embeddings" / f"{part}.npy", split_dir / "metadata" / f"{part}.parquet"]

    def write_part(self, split_dir: Path, part: Part) -> None:
        pq = require("pyarrow.parquet", "export", "Exporting features")
        npy, meta = self.files(split_dir, part.name)
        blocks = []

        def write(tmp: str) -> None:
            # The header says the final shape; the rows follow block by block, so a part never
            # needs to fit in memory at once.
            with open(tmp, "wb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(part.dtype), "fortran_order": False,
                          "shape": (part.rows, part.dim)}
                np.lib.format.write_array_header_1_0(f, header)
                for b in part.read():
                    f.write(np.ascontiguousarray(b.vectors, dtype=part.dtype).tobytes())
                    blocks.append(b.without_vectors())

        atomic_write(npy, write)
        table = part.metadata(blocks)
        atomic_write(meta, lambda tmp: pq.write_table(table, tmp))
