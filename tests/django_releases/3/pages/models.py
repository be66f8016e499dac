from django.db import models


class Tick(models.Model):
    """One run of the record_tick Celery task: proof that beat, Redis and Celery work."""

    source = models.CharField(max_length=40)
    created = models.DateTimeField(auto_now_add=True)
    # Release 2. A default kept by the database (db_default), not only by Django: until the reload
    # has rolled them, release 1's Celery workers and web workers still insert rows without this
    # column, after the migration has already added it.
    release = models.IntegerField(db_default=1)

    class Meta:
        # Release 3, a mistake: the rows written before release 3 violate it, so the migration
        # fails on the production data.
        constraints = [
            models.CheckConstraint(condition=models.Q(release__gte=3), name="tick_release_gte_3"),
        ]
