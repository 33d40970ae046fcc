"""Planner service: watches instance load in Redis, owns the cluster topology (epoch + one
entry per live instance), publishes every change on NATS, and drives drops and restores
through the two-phase reconfiguration protocol. Later: deciding them automatically.

Layout: ``settings.py`` (process edge); ``service.py`` (the poll loop and the ``Reconfigure``
handler, wiring the parts below); I/O parts ``load_reader.py``, ``topology_publisher.py`` (the
one writer of the topology), ``control_channel.py`` (commands to workers),
``rendezvous_store.py`` (the TCPStore groups meet at) and ``reconfiguration_coordinator.py``
(prepare/commit/abort/restore, callable by other planner code); pure decision modules that
import no torch/redis/nats: ``membership.py``, ``group_transitions.py`` (the group lifecycle),
``reconfigure_validation.py``.
"""
