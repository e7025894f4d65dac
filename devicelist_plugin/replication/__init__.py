"""Replication: the inbound updater and the outbound sender, and what they share."""
