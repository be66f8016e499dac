from django.http import HttpResponse


def home(request):
    return HttpResponse("Hello from release 2, deployed in place\n", content_type="text/plain")
