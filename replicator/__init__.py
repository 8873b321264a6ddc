"""Replicator daemon: projects the telstate log into a Redis mirror, RDB snapshots and followers.

Run it as ``telstate-replicator`` or ``python -m replicator`` (see
:mod:`replicator.__main__`). One module per concern:

- :mod:`replicator.source`: what the sinks read (a store's event log and snapshots);
- :mod:`replicator.cursor`: where a mirror stands, kept in Redis beside it;
- :mod:`replicator.connection`: connecting to the mirror, and naming it without credentials;
- :mod:`replicator.acl`: the Redis ACL rules that keep clients from writing the mirror;
- :mod:`replicator.redis_sink`: the state machine that keeps a mirror exact;
- :mod:`replicator.snapshot_sink`: atomic RDB snapshots, named by store and seq;
- :mod:`replicator.log_stream`: the log stream that followers read;
- :mod:`replicator.follow`: the ``follow`` command, keeping a follower store up to date;
- :mod:`replicator.promotion`: fencing the old primary off after a promotion;
- :mod:`replicator.daemon`: wake-ups, threads and stopping;
- :mod:`replicator.status`: the ``status`` command;
- :mod:`replicator.verify`: comparing a mirror with its store.
"""
