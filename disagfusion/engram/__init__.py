"""Engram conditional memory: N-gram hashing, the arena file format and the client that reads it.

Clients hash and map arenas here; ``services/engram_store`` owns arenas and serves lookups.
"""
