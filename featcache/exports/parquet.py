"""``parquet``: one table per part, ``SPLIT/embeddings/0000.parquet``, the vector in a fixed-size-list
column ``embedding`` beside the metadata columns (embedding-reader's ``parquet`` layout)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..common.files import atomic_write
from .base import FORMATS, ExportFormat, Part, require

#: The column holding the vectors (embedding-reader's default ``embedding_column``).
EMBEDDING_COLUMN = "embedding"


@FORMATS.register("parquet", description="SPLIT/embeddings/NNNN.parquet: an 'embedding' fixed-size-list column "
                                         "beside the metadata")
class ParquetFormat(ExportFormat):
    name = "parquet"
    folders = ("embeddings",)

    def files(self, split_dir: Path, part: str) -> list[Path]:
        return [split_dir / "embeddings" / f"{part}.parquet"]

    def write_part(self, split_dir: Path, part: Part) -> None:
        pa = require("pyarrow", "export", "Exporting features")
        pq = require("pyarrow.parquet", "export", "Exporting features")
        value_type = pa.float16() if part.dtype == np.float16 else pa.float32()

        def write(tmp: str) -> None:
            writer = None
            try:
                for b in part.read():  # one row group per block: a part never needs to fit in memory
                    flat = pa.array(np.ascontiguousarray(b.vectors, dtype=part.dtype).reshape(-1), value_type)
                    table = part.metadata([b])
                    table = table.add_column(0, EMBEDDING_COLUMN, pa.FixedSizeListArray.from_arrays(flat, part.dim))
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema)
                    writer.write_table(table)
            finally:
                if writer is not None:
                    writer.close()

        atomic_write(self.files(split_dir, part.name)[0], write)
