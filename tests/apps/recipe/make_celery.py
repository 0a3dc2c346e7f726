"""The example's worker module, unchanged: ``celery -A tests.apps.recipe.make_celery worker``."""

from tests.apps.recipe import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
