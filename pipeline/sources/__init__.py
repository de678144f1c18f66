"""Readers for each raw input format, and the Beam transforms that join and validate them."""
