"""Cryptography behind a narrow API: callers never choose algorithms, nonces or encodings."""
