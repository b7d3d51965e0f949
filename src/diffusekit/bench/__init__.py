"""Benchmarks behind `diffusekit bench`: comparisons against the exact oracle and against peer libraries."""
