"""SOCI indexes: the model (manifest v1 and v2), building them, pushing and converting."""
