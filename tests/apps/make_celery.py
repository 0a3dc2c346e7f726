"""The worker entry point of the factory app: ``celery -A tests.apps.make_celery:celery worker``."""

from tests.apps.factory import create_app

flask_app = create_app()
celery = flask_app.extensions["pymacaron_async"].celery
