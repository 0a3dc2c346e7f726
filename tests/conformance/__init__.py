"""Celery's own integration suite (``t/integration`` of the installed Celery's sdist), on raw Celery and on the
extension's app: ``python -m tests.conformance.run`` (``make conformance``, ``make conformance-ci``)."""
