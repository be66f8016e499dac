"""Creates the benchmark database next to the project: migrate, then a few catalog items.
Run by benches/web.sh with the servers' Python before any server starts."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchsite.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402

from catalog.models import Item  # noqa: E402

call_command("migrate", verbosity=0)
Item.objects.all().delete()
Item.objects.bulk_create(
    Item(name=f"item number {number}", price_cents=199 + 250 * number, in_stock=number % 3 != 0)
    for number in range(1, 21)
)
