"""TorchServe handler for tensor-parallel models traced by tracer (see its own issue)."""
