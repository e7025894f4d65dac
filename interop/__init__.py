"""Interoperability harness: our standalone server next to a real Synapse.

Blocking helpers (``synapse``, ``devicelist``, ``federation``, ``join``) used
by the trial tests ``interop/test_*.py`` (``make interop``) and by the
benchmarks.
"""
