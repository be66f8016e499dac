from django.db import models


class Tick(models.Model):
    """One run of the record_tick Celery task: proof that beat, Redis and Celery work."""

    source = models.CharField(max_length=40)
    created = models.DateTimeField(auto_now_add=True)
