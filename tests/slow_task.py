"""A task whose module takes seconds to import (a heavy package would): the control API must keep answering
meanwhile."""

import time

from tests.tiny_task import TinyTask

time.sleep(3)


class SlowTask(TinyTask):
    name = "slow"
