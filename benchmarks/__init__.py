"""Throughput benchmarks of byol_fast: the step, the data pipelines, end to end, and peer libraries.

Run each as a module from the repository root (`python -m benchmarks.step_bench --help`);
`benchmarks/run_gpu_sweep.sh` runs them all on one GPU inside one device call, and
`python -m benchmarks.report` rebuilds the Markdown tables and the README's performance table
from the JSON files under benchmarks/results/.
"""
