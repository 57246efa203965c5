"""Benchmarks of the trainer's real components: throughput per phase (``throughput.py``) and the device checks of
the GPU smoke run (``device_checks.py``); the CLIs are tools/benchmark_throughput.py and tools/gpu_smoke.sh."""
