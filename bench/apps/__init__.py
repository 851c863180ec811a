"""Apps doing a framework's real work per request, for bench/realistic.py (FastAPI, Flask)."""
