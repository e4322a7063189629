"""The graph passes; each takes a GraphModule and returns it rewritten."""
