"""Gateway: the OpenAI-compatible HTTP API in front of the mesh.

Tokenizes prompts, admits or refuses requests (429), submits them to the routers over NATS,
streams the workers' token updates back as SSE, and records every request in the ledger,
in metrics and in a trace. Entry points: ``create_app`` (``app.py``), ``python -m
kunserve.gateway`` (``__main__.py``).
"""
