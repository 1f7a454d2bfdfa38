"""User-facing tools and the embedded default model (8x8 digits), by job: :mod:`samples.generate`
(``guidance-generate``), :mod:`samples.evaluate` (``guidance-evaluate``), :mod:`samples.metrics` and
:mod:`samples.digits`; the modules at this level are shared by both tools."""
