"""KunServe-mesh: parameter-centric LLM serving (drop replicated parameters under KV bursts)."""
