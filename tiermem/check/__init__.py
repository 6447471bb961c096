"""The model-based check: a reference model, a hypothesis state machine, targets, a runner.

`tiermem check` runs it from the command line; docs/testing.md describes the
targets, the profiles and how to reproduce a failing run.
"""
