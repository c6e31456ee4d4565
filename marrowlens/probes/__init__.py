"""Probes on frozen embeddings: blast detection, mutation classification, cell types."""
