"""Tests of devicelist_plugin.federation."""
