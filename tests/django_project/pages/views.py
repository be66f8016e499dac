from django.http import HttpResponse


def home(request):
    return HttpResponse("Hello from release 1\n", content_type="text/plain")
