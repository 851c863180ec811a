"""The test apps wrapped in wsgiref.validate.validator (tests/test_wsgi_conformance.py): each request
checks the bridge's environ, start_response, wsgi.input and iteration (and the app's side), and
fails with an AssertionError (a 500 and a log line) on a breach. Serve with --interface wsgi."""

from wsgiref.validate import validator

from tests.apps import wsgi_cases, wsgi_conformance

cases = validator(wsgi_cases.app)
conformance = validator(wsgi_conformance.app)


def __getattr__(name):  # Flask and Django only when asked: each is imported by the worker serving it
    if name == "flask":
        from tests.apps import flaskapp

        return validator(flaskapp.app)
    if name == "django":
        from tests.apps.djproj import wsgi

        return validator(wsgi.application)
    raise AttributeError(name)
