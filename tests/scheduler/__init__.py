"""Tests of the pure scheduler core."""
