"""The toolkit's benchmarks, run from the repository root as ``python -m bench.<name>``.

Protocol benchmarks (this package: the numbers BENCHMARKS.md leads with) and one-off
investigations (``bench.investigations``) each write ``bench/results/<name>.json``;
``python -m bench.report`` builds BENCHMARKS.md from those files. ``common``, ``peers`` and
``sampler_variants`` are shared helpers.
"""
