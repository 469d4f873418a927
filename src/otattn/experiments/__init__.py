"""otattn.experiments: measurements and training runs behind the book's later chapters.

- :mod:`otattn.experiments.bench` -- speed and peak memory of GOAT attention against
  plain SDPA, a materialised log-prior, an eager softmax, FlexAttention and the authors'
  package (``python -m otattn bench``);
- :mod:`otattn.experiments.precision` -- the error of GOAT attention in float32,
  bfloat16 and float16 against float64, next to plain SDPA's
  (``python -m otattn precision``);
- :mod:`otattn.experiments.tasks` -- sequence tasks (``copy_mixture``, ...) with their
  losses, metrics and best attainable values;
- :mod:`otattn.experiments.config`, :mod:`otattn.experiments.train` and
  :mod:`otattn.experiments.checkpoint` -- the training loop with its configuration and
  atomic, resumable checkpoints (``python -m otattn train``, also under ``torchrun``);
- :mod:`otattn.experiments.sweep` -- one run per attention variant and seed, with the
  small results kept for the book (``python -m otattn sweep``, ``--jobs`` at once);
- :mod:`otattn.experiments.retrieval` -- passkey and needle-in-a-haystack sequences;
  :mod:`otattn.experiments.extrapolation` scores trained models on a depth x length
  grid through their KV caches (``python -m otattn extrapolate``);
  :mod:`otattn.experiments.throughput` times training and decoding;
- :mod:`otattn.experiments.shakespeare` -- the Shakespeare text, its split and the
  character task; :mod:`otattn.experiments.probes` -- sinks, gates and activations of
  trained models (``python -m otattn probes``).

Importing this package does not import PyTorch; the modules below it do.
"""
