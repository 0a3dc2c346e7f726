"""A Flask-SQLAlchemy app whose tasks read the row the request wrote: ``publish="after_commit"``.

Configured from the environment, so the test and its worker use the same
database and table: PMA_ORDERS_DB_URL (SQLite file or PostgreSQL) and
PMA_ORDERS_TABLE; tasks report to the run's Redis under PMA_TEST_PREFIX.
"""

from __future__ import annotations

import json
import os

import redis
from flask import Flask, current_app
from flask_sqlalchemy import SQLAlchemy

from flask_pymacaron_async import PymacaronAsync

db = SQLAlchemy()
ext = PymacaronAsync()


class Order(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = os.environ.get("PMA_ORDERS_TABLE", "pma_orders")
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String(80), unique=True, nullable=False)


def create_app(**config) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="orders-secret",
        SQLALCHEMY_DATABASE_URI=os.environ.get("PMA_ORDERS_DB_URL", "sqlite://"),
        SQLALCHEMY_TRACK_MODIFICATIONS=False,
        PYMACARON_ASYNC_BROKER_URL=os.environ.get("PMA_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"),
        PYMACARON_ASYNC_PUBLISH="after_commit",
        CELERY={"task_default_queue": os.environ.get("PMA_ORDERS_QUEUE", "pma-orders")},
        REPORT_PREFIX=os.environ.get("PMA_TEST_PREFIX", "pma-test"),
    )
    app.config.update(config)
    db.init_app(app)
    ext.init_app(app)
    return app


@ext.task
def ship(name):
    """Reads the order the request created: it must exist when the task runs."""
    found = db.session.query(Order).filter_by(name=name).one_or_none()
    with redis.Redis.from_url(current_app.config["PYMACARON_ASYNC_BROKER_URL"]) as client:
        client.rpush(
            f"{current_app.config['REPORT_PREFIX']}:ship", json.dumps({"name": name, "found": found is not None})
        )


@ext.task(publish="immediate")
def notify(name):
    """Published at once, whatever the transaction."""


app = create_app()
celery = ext.celery
