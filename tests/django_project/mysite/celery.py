"""mysite's Celery app, laid out as in Celery's "First steps with Django": configured from the
CELERY_* settings, tasks found in each installed app's tasks.py. The worker runs as
`python -m celery -A mysite worker` ([programs.celery] in sauna.toml)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

app = Celery("mysite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
