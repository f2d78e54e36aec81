"""The ops bundle: rules, dashboards, runbooks, collector and Kubernetes manifests, rendered
from one configuration (``config.py``) by ``instrumented-core ops export``."""
