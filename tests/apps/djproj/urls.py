import os

from django.http import FileResponse, HttpResponse
from django.urls import path


def home(request):
    return HttpResponse(f"hello from django {os.getpid()}\n", content_type="text/plain")


def echo(request):  # request.body: Django's one read of CONTENT_LENGTH bytes (test_wsgi_conformance)
    return HttpResponse(request.body, content_type="application/octet-stream")


def file(request):  # FileResponse goes through wsgi.file_wrapper when the server has one
    from tests.apps import wsgi_conformance

    path = wsgi_conformance._file(int(request.GET.get("size", "100000")))
    return FileResponse(wsgi_conformance.Counting(open(path, "rb")))  # noqa: SIM115 -- closed by Django


urlpatterns = [path("", home), path("echo", echo), path("file", file)]
