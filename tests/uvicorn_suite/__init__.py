"""uvicorn's protocol suite against prefork's protocol class (a package: its conftest must not take the
name `conftest`, which prefork's tests import tests/conftest.py by)."""
