from django.contrib import admin

from .models import Tick

admin.site.register(Tick)
