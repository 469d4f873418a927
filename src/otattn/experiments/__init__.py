"""otattn.experiments: measurements and training runs behind the book's later chapters.

- :mod:`otattn.experiments.bench` -- speed and peak memory of GOAT attention against plain
  SDPA, a materialised log-prior, an eager softmax, FlexAttention and the authors' package
  (``python -m otattn bench``).

Importing this package does not import PyTorch; the modules below it do.
"""
