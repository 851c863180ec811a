"""`prefork serve`'s worker side: uvicorn's HTTP machinery fed with the connections the primary hands over.

Needs the `serve` extra (`pip install prefork[serve]`): uvicorn, httptools, uvloop.
"""
