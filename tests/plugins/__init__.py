"""Example plugin tasks, loaded by the tests the way a user's own package would be."""
