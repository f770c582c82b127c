"""What is done with a cache: fit heads (``fit``, with the data-driven defaults of ``adapt``), saved
runs (``saved``, ``artifacts``), prediction and export (``inference``), fine-tuning from images
(``finetuning``), layer probes (``probe``), benchmarks (``bench``) and the demo."""
