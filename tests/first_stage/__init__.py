"""Tests of edje.first_stage: linear probe, dual encoders, FAISS search."""
