"""Tests of local users' devices and keys: validation and the host API."""
