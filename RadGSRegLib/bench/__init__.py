"""Benchmarks and peer methods (``radgsreg bench ...``). Separate from the tests."""
