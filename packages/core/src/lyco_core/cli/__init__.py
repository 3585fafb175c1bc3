"""The `lyco` command line: thin layers over library calls."""
