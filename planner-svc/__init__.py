"""Planner service: watches instance load in Redis, owns the cluster topology (epoch + one
entry per live instance) and publishes every change on NATS. Later: drop/restore plans.

Layout: ``settings.py`` (process edge), ``service.py`` (the poll loop, the only code that talks
to Redis and NATS, through ``load_reader.py`` and ``topology_publisher.py``), and pure decision
modules (``membership.py``; the drop/restore plan goes beside it) that import no redis/nats.
"""
