"""Evaluation: benchmark readers (items.py), the fair protocol and scores (protocol.py), the run on
the cluster (harness.py), the CLI (cli.py, `python -m trainer eval`) and benchmark twins (twins.py)."""
