from django.http import HttpResponse


def home(request):
    return HttpResponse("Hello from release 3, deployed in place\n", content_type="text/plain")
