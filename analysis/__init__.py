"""Reports over run folders: comparison tables and plots for sweeps and benchmarks."""
