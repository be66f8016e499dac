from celery import shared_task

from .models import Tick


@shared_task(name="pages.record_tick")
def record_tick(source):
    Tick.objects.create(source=source, release=2)
