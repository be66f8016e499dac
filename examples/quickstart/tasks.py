"""The quickstart Celery app with two tasks; the broker is the Redis the example supervises."""

import logging
import os

from celery import Celery

app = Celery("tasks", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6399/0"))
app.conf.broker_connection_retry_on_startup = True
log = logging.getLogger(__name__)


@app.task
def add(x, y):
    """Adds two numbers; queued by the web app's /add page."""
    log.info("add(%s, %s) = %s", x, y, x + y)
    return x + y


@app.task
def cleanup(max_age="1h"):
    """Pretends to delete old sessions; published by beat every 10 seconds."""
    log.info("cleanup: removing sessions older than %s", max_age)
    return max_age
