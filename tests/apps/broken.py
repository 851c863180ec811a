"""An app module whose own import fails (a missing dependency inside the app)."""

import this_dependency_does_not_exist  # noqa: F401

app = None
