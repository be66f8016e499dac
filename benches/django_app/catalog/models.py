from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=100)
    price_cents = models.PositiveIntegerField()
    in_stock = models.BooleanField(default=True)

    class Meta:
        ordering = ["name"]
