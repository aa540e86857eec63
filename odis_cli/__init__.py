"""The `odis` command line: parses, validates, shows progress and tables; computes nothing."""
