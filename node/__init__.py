"""A fedmq node: trains the global model on local data and publishes the delta."""
