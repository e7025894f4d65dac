"""Tests of the storage layer, run against SQLite and PostgreSQL."""
