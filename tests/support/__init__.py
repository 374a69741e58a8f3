"""The test suite's helper library: the engine profile, engine helpers, tiny-model fixtures'
types, worker-side recorders and the transformers replays of each drafter method."""
