"""The CPU reference cluster: real rank processes, real Gloo collectives, a coordinator."""

from instrumented_core.cluster.client import Cluster, ClusterError, CollectiveHang, RequestHandle
from instrumented_core.cluster.config import ClusterConfig, ClusterConfigError

__all__ = ["Cluster", "ClusterConfig", "ClusterConfigError", "ClusterError", "CollectiveHang",
           "RequestHandle"]
