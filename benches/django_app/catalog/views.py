from django.shortcuts import render

from .models import Item


def item_list(request):
    """One query (the items, in name order), rendered through a template."""
    return render(request, "catalog/items.html", {"items": list(Item.objects.all())})
