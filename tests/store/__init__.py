"""Tests of edje.store: the token store, its fingerprints, and encoding images into it."""
