"""
A local counterdb cluster for fault tests and experiments: the library
behind the ``counterdb-cluster`` tool (:mod:`counterdb.localcluster.cli`).

:class:`LocalCluster` runs N real counterdb nodes (``twistd -n counterdb``)
as separate processes, using the code of the ``counterdb`` package this
package was imported from (``PYTHONPATH`` is set to the package's parent
directory). With ``python=`` the nodes run in that interpreter instead, with
only what it has installed (a virtualenv holding an earlier release, for
upgrade tests); :meth:`LocalCluster.set_python` switches one stopped node.
Each node gets a directory ``<base_dir>/<name>`` holding its data dir
(``data``) and its log (``node.log``).

Two modes:

- **loopback** (default): nodes listen on 127.0.0.2, 127.0.0.3, ... all on
  one port, and get the bare-IP actors list ``["127.0.0.2", ...]``.
- **netns** (``netns=True``, root only, needs ``ip`` and, for faults,
  ``iptables``): each node runs in its own network namespace, joined to a
  Linux bridge in the root namespace by a veth pair. The bridge takes the
  first address of a small private subnet (default 10.213.0.0/24, or the next
  free 10.213.N.0/24), the nodes the following ones. Inside its namespace a
  node listens on 127.0.0.1:<port+1> with ``--advertise <address>:<port>``,
  and a delaying TCP proxy (:mod:`counterdb.localcluster.proxy`) listens on
  ``<address>:<port>`` and forwards to it. Faults are applied inside the
  namespaces only: iptables ``DROP`` rules for partitions and packet loss,
  and the proxy's delay for slowness. The controlling process, in the root
  namespace, reaches every node whatever the partitions.

The cluster's state (mode, addresses, pids, namespace and link names,
faults) is kept in ``<base_dir>/cluster.json``, so another process can
:meth:`LocalCluster.load` it and act on the same cluster; every operation
takes an ``flock`` on ``<base_dir>/cluster.lock`` and re-reads that file
first.

Nodes are started in their own sessions, so they outlive the process that
started them until :meth:`LocalCluster.down`. Every wait in here polls a
condition until a deadline; nothing waits without a bound.

Modules, by job:

- :mod:`~counterdb.localcluster.cluster`: :class:`LocalCluster`, which ties
  the others together;
- :mod:`~counterdb.localcluster.state`: the records in ``cluster.json``, the
  error type, locks;
- :mod:`~counterdb.localcluster.processes`: spawning, watching and stopping
  node and proxy processes, ports, readiness waits;
- :mod:`~counterdb.localcluster.network`: namespaces, veths, the bridge, the
  subnet, iptables faults;
- :mod:`~counterdb.localcluster.proxy`: the delaying proxy, with flow control;
- :mod:`~counterdb.localcluster.cli`: the ``counterdb-cluster`` command line.
"""

from counterdb.localcluster.cluster import LocalCluster
from counterdb.localcluster.processes import (
    PACKAGE_PARENT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    TWISTD,
    free_common_port,
)
from counterdb.localcluster.state import (
    LOOPBACK,
    NETNS,
    PAUSED,
    RUNNING,
    STOPPED,
    ClusterError,
    Faults,
    NodeStatus,
)

__all__ = [
    "LOOPBACK",
    "NETNS",
    "PACKAGE_PARENT",
    "PAUSED",
    "RUNNING",
    "START_TIMEOUT",
    "STOPPED",
    "STOP_TIMEOUT",
    "TWISTD",
    "ClusterError",
    "Faults",
    "LocalCluster",
    "NodeStatus",
    "free_common_port",
]
