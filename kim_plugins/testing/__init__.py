"""Test helpers that users can also call: dataset fixtures and tiny config overrides."""
