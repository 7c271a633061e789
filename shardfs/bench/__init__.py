"""Benchmarks: ``scripts/bench`` (frontend and guest), the hot path alone, DAX.

They sit on top of everything, the test doubles of :mod:`shardfs.testing`
included, and nothing in the daemon imports them.
"""
