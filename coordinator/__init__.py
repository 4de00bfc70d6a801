"""Sagaplane's coordinator service."""
