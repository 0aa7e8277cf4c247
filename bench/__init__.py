"""convops benchmark and profiling harness: `python -m bench --help`."""
