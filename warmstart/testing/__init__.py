"""Helpers shared by warmstart's tests and benchmarks: local S3 servers, checkpoint makers."""
