"""Benchmarks of MASSV and the other speculative-decoding methods inside vLLM, and their library."""
