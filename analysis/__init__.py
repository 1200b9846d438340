"""What is done with finished runs: reports (comparison tables and plots for sweeps and
benchmarks), gate maps, and the export of an adapted node's network (``analysis.export``)."""
