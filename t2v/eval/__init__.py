"""Video quality evaluation: fidelity metrics to a reference video (`metrics`), the FP-vs-quantized quality
benchmark (`quality`, driven by `bench/quality.py`), and VBench result tables (`vbench_table`, `vbench_run`)."""
