"""Pipelined serving across processes: a group of ``g`` workers holds one copy of the model.

``stage_link`` (the epoch's process group and its send/recv helpers), ``stage_messages`` (what
ranks tell each other), ``group_member`` (joining: load the layer range, agree on the block
count), ``leader_runner`` and ``pipeline_engine`` (rank 0: scheduler and stage 0),
``stage_runner`` (every other rank's loop).
"""
