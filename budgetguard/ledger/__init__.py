"""The durable usage ledger: the usage stream shipped into SQL, exactly once, and reported from.

* :mod:`.rows`: events to rows and back (no I/O).
* :mod:`.store`: the ``usage_events`` table on SQLite or PostgreSQL (SQLAlchemy Core).
* :mod:`.shipper`: the Redis consumer-group loop (at least once from the stream,
  acknowledged after commit, exactly once in the table).
* :mod:`.metrics`, :mod:`.command`: the shipper's metrics and the CLI's parts.

Needs the ``[ledger]`` extra (SQLAlchemy 2, psycopg 3).
"""
