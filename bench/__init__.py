"""The benchmark suite behind `tiermem bench`: tiermem beside its building blocks.

Every scenario measures tiermem and at least one baseline (a bare pyzmq
socket pair, a bare redis-server, the `eventsourcing` library) in the same
run, alternating rounds, so that load from other processes on the machine
falls on both sides. `bench.runner.run_suite` runs the scenarios;
`bench.report` prints, saves and plots their results.
"""
