"""Benchmarks of the job and its services. Each runs from the repository root as a module, e.g.
`python -m bench.step --help`; what several share is in bench.runner."""
