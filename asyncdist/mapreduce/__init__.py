"""MapReduce (Disco re-created): ``from asyncdist.mapreduce import Job, result_iterator, kvgroup``.

A master (:class:`Master`, ``asyncdist master``) schedules the map and reduce
tasks of jobs on slaves (:class:`Slave`, ``asyncdist slave``), which keep the
partitioned map output and the results on their local disks and stream them
to reducers and readers. :class:`Job` submits a job (to this event loop's
embedded cluster when no master is given) and waits for its results;
:func:`result_iterator` streams them; :func:`kvgroup` groups sorted pairs.
"""

from ..errors import MasterLost
from ._io import default_partition, kvgroup
from ._job import Job, Results, result_iterator, shutdown_local_cluster
from ._master import Master
from ._slave import Slave

__all__ = [
    "Job",
    "Master",
    "MasterLost",
    "Results",
    "Slave",
    "default_partition",
    "kvgroup",
    "result_iterator",
    "shutdown_local_cluster",
]
