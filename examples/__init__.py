"""Runnable examples of Sagaplane participants."""
