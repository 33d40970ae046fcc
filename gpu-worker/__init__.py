"""GPU worker: the inference engine (model, paged KV cache, scheduler) and, later, its process wrapper."""
