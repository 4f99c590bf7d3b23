"""Merge methods: the tensor math behind `Merge` weight expressions, one module per method family."""
