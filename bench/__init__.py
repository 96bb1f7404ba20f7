"""Side-by-side benchmarks; run them as modules (``python -m bench.<name>``), see bench/README.md."""
