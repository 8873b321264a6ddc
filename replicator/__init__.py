"""Replicator daemon: projects the telstate log into a Redis mirror and RDB snapshots."""
