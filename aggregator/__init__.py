"""The fedmq aggregator: validates updates, averages them per round, republishes the model."""
