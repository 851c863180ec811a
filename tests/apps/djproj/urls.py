import os

from django.http import HttpResponse
from django.urls import path


def home(request):
    return HttpResponse(f"hello from django {os.getpid()}\n", content_type="text/plain")


urlpatterns = [path("", home)]
