"""Benchmarks behind `make bench`: each section measures something and returns Markdown."""
