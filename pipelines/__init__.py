"""End-to-end recipes that compose the three jobs: shard -> train -> eval."""
