"""Matplotlib views of attention (filled in as the views land)."""
