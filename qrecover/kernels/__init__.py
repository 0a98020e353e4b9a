"""Backends that compute the mixed-precision linear layer."""
