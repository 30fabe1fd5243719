"""Concept erasure methods (ESD, ...) and their run folders."""
